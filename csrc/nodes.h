// What csext's hand-written autograd nodes share (autograd.cpp: the layer ops' nodes;
// triton_node.cpp: the triton backend's fused linear layer's).
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/dynamo/compiled_autograd.h>

#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace csext {

// The pointer type of autograd nodes: std::shared_ptr up to torch 2.11, c10::intrusive_ptr after.
using NodePtr = decltype(torch::autograd::Edge::function);

template <class T>
auto make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    // As torch 2.11 makes its nodes: deleteNode (found by ADL, so 2.13 never looks for it)
    // frees a long graph without deep recursion.
    return std::shared_ptr<T>(new T(), [](auto* node) { deleteNode(node); });
  } else {
    return c10::make_intrusive<T>();
  }
}

// Binds `functional` into compiled autograd's graph and calls it there on `grads` and `args`,
// as CppNode does for torch::autograd::Function.
inline torch::autograd::variable_list call_compiled(
    const torch::autograd::Node& node, torch::dynamo::autograd::SwapSavedVariables& saved,
    const std::string& name, torch::autograd::functional_apply_t functional,
    const torch::autograd::variable_list& grads, const std::vector<at::IValue>& args) {
  std::vector<at::TypePtr> schema;
  schema.reserve(args.size());
  for (const at::IValue& arg : args) {
    schema.emplace_back(arg.isTensor() ? at::TensorType::get() : arg.type());
  }
  const auto output_metadata = torch::dynamo::autograd::IValuePacker<
      std::vector<std::optional<torch::autograd::InputMetadata>>>::
      pack(torch::dynamo::autograd::get_input_metadata(node.next_edges()));
  const auto& compiler = torch::dynamo::autograd::getPyCompilerInterface();
  const std::string bound =
      compiler->bind_function(saved.get_py_compiler(), name, std::move(functional), schema,
                              /*is_custom_function=*/true, /*is_traceable=*/true);
  return compiler->call_function(saved.get_py_compiler(), "apply_functional", bound, grads, args,
                                 output_metadata);
}

}  // namespace csext
