// The one CUDA translation unit of the GPU tests: it instantiates the backend for the .cpp
// tests, which see only <slimgrad/backend/cuda/api.hpp> (design.md §3).
#include <slimgrad/cuda.cuh>

namespace sg = slimgrad;
template class sg::cuda::MultiTensorAdam<sg::state::Fp32>;
template class sg::cuda::MultiTensorAdam<sg::state::Bf16>;
template class sg::cuda::MultiTensorAdam<sg::state::Q8Block<256>>;
template class sg::cuda::MultiTensorGwt<sg::transforms::Haar, 2>;
template class sg::cuda::MultiTensorGwt<sg::transforms::Haar, 3>;
template class sg::cuda::Linear<sg::activation::None>;
template class sg::cuda::Linear<sg::activation::VeLoRA>;
template class sg::cuda::Linear<sg::activation::CompAct>;
template class sg::cuda::MultiTensorLowRank<sg::transforms::SvdProjection>;
template class sg::cuda::MultiTensorLowRank<sg::transforms::Grassmann>;
template void sg::cuda::q8_quantize_codes<float>(const float*, const float*, std::uint8_t*,
                                                 sg::index_t, sg::state::Moment,
                                                 sg::cuda::stream_t);
template void sg::cuda::fill_gaussian<float>(sg::DeviceView<float>, const sg::random::Key&, double,
                                             sg::cuda::stream_t);
template void sg::cuda::dwt_forward_rows<sg::transforms::Haar, 2>(sg::DeviceView<const float>,
                                                                  sg::DeviceView<float>,
                                                                  sg::transforms::BoundaryMode,
                                                                  sg::cuda::stream_t);
template void sg::cuda::dwt_inverse_rows<sg::transforms::Haar, 2>(sg::DeviceView<const float>,
                                                                  sg::DeviceView<float>,
                                                                  sg::transforms::BoundaryMode,
                                                                  sg::cuda::stream_t);
template void sg::cuda::dwt_forward_rows<sg::transforms::Haar, 3>(sg::DeviceView<const float>,
                                                                  sg::DeviceView<float>,
                                                                  sg::transforms::BoundaryMode,
                                                                  sg::cuda::stream_t);
template void sg::cuda::dwt_inverse_rows<sg::transforms::Haar, 3>(sg::DeviceView<const float>,
                                                                  sg::DeviceView<float>,
                                                                  sg::transforms::BoundaryMode,
                                                                  sg::cuda::stream_t);
template std::byte* sg::cuda::device_allocate<std::byte>(std::size_t);
template void sg::cuda::device_free<std::byte>(std::byte*) noexcept;
template void sg::cuda::copy_to_host<std::byte>(std::byte*, const std::byte*, std::size_t,
                                                sg::cuda::stream_t);
template void sg::cuda::copy_to_device<std::byte>(std::byte*, const std::byte*, std::size_t,
                                                  sg::cuda::stream_t);
