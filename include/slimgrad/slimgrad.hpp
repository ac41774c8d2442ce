// slimgrad/slimgrad.hpp — umbrella for C++ translation units: core, policies and the CPU
// backend. CUDA translation units include <slimgrad/cuda.cuh> instead (no Eigen there).
#pragma once

#include "core/backend.hpp"
#include "core/concepts.hpp"
#include "core/config.hpp"
#include "core/error.hpp"
#include "core/orientation.hpp"
#include "core/view.hpp"

#include "core/philox.hpp"

#include "backend/cpu/identity.hpp"
#include "transforms/dwt.hpp"
#include "backend/cpu/dwt.hpp"
#include "backend/cpu/random_projection.hpp"
#include "io/safetensors.hpp"
#include "backend/cpu/adafactor.hpp"
#include "backend/cpu/adam.hpp"
#include "backend/cpu/optimizer.hpp"
#include "optim/recipes.hpp"
#include "optim/fields.hpp"
#include "io/checkpoint.hpp"
#include "transforms/svd_projection.hpp"
#include "transforms/grassmann.hpp"
#include "backend/cpu/svd.hpp"
#include "backend/cpu/svd_projection.hpp"
#include "backend/cpu/grassmann.hpp"
#include "core/numeric.hpp"
#include "state/stores.hpp"
#include "state/q8_math.hpp"
#include "backend/cpu/stores.hpp"
