// The tags every csext op is defined with (ops.cpp).
#pragma once

#include <torch/library.h>

#include <vector>

namespace csext {

// cudagraph_unsafe: the CUDA kernels take beta from a CPU tensor on the host, so a CUDA graph
// would replay the beta it was recorded with. torch.compile(mode="reduce-overhead") therefore
// runs these ops between its CUDA graphs, where a changing beta is read afresh each call.
inline const std::vector<at::Tag> kTags = {at::Tag::pt2_compliant_tag, at::Tag::cudagraph_unsafe};

}  // namespace csext
