// slimgrad/slimgrad.hpp — umbrella for C++ translation units: core, policies, the CPU backend
// and I/O. CUDA translation units include <slimgrad/cuda.cuh> instead (no Eigen there).
#pragma once

// Core: configuration, backend tags, views, concepts, the counter-based generator.
#include "core/backend.hpp"
#include "core/concepts.hpp"
#include "core/config.hpp"
#include "core/error.hpp"
#include "core/numeric.hpp"
#include "core/orientation.hpp"
#include "core/philox.hpp"
#include "core/view.hpp"

// Policy descriptors and their host/device math.
#include "activation/codecs.hpp"
#include "activation/linear.hpp"
#include "optim/adafactor.hpp"
#include "optim/adam.hpp"
#include "optim/fields.hpp"
#include "optim/flora.hpp"
#include "optim/optimizer.hpp"
#include "optim/recipes.hpp"
#include "optim/residual.hpp"
#include "state/q8_math.hpp"
#include "state/stores.hpp"
#include "transforms/compact_projection.hpp"
#include "transforms/dwt.hpp"
#include "transforms/grassmann.hpp"
#include "transforms/identity.hpp"
#include "transforms/random_projection.hpp"
#include "transforms/svd_projection.hpp"

// The CPU backend.
#include "backend/cpu/activation.hpp"
#include "backend/cpu/adafactor.hpp"
#include "backend/cpu/adam.hpp"
#include "backend/cpu/compact_projection.hpp"
#include "backend/cpu/dwt.hpp"
#include "backend/cpu/flora.hpp"
#include "backend/cpu/grassmann.hpp"
#include "backend/cpu/identity.hpp"
#include "backend/cpu/optimizer.hpp"
#include "backend/cpu/random_projection.hpp"
#include "backend/cpu/stores.hpp"
#include "backend/cpu/svd.hpp"
#include "backend/cpu/svd_projection.hpp"

// I/O: safetensors files and optimizer checkpoints.
#include "io/checkpoint.hpp"
#include "io/safetensors.hpp"
