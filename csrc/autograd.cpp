// Autograd of csext::gate and of the gated layers csext::gated_linear / csext::gated_conv2d.
//
// A gated layer is one op and one autograd node: its forward gates the weight and runs ATen's
// linear or convolution, its backward ATen's matmuls or convolution_backward and then the gate's
// backward. The nodes are written as ATen writes its own generated ones, on torch's internal
// autograd headers: a torch::autograd::Function node costs more host time per call than the
// whole gated layer adds to a small plain layer (bench/host.py). This is the one file of csext
// on torch's internal autograd and dynamo headers; the rest uses torch/library.h, ATen and
// (fast_path.cpp) torch/extension.h.
//
// Everything is called through the dispatcher, so one registration serves every device's
// kernels, and torch.compile traces the inner ops (csext::gate through the fake kernels of
// csext/backends/aten.py, ATen's own) into its graph.
#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include "gate_checks.h"

#include <array>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace csext {
namespace {


// The pointer type of autograd nodes, which differs between torch releases (shared_ptr, intrusive_ptr).
using NodePtr = decltype(torch::autograd::Edge::function);

template <class T>
auto make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    // As torch makes its shared_ptr nodes: deleteNode frees a long graph without deep recursion.
    return std::shared_ptr<T>(new T(), [](auto* node) { deleteNode(node); });
  } else {
    return c10::make_intrusive<T>();
  }
}

// Binds `functional` into compiled autograd's graph and calls it there on `grads` and `args`,
// as CppNode does for torch::autograd::Function.
torch::autograd::variable_list call_compiled(
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

using at::ScalarType;
using torch::autograd::variable_list;

at::Tensor call_gate(const at::Tensor& weight, const at::Tensor& mask_logits,
                     const at::Tensor& beta, bool hard, double penalty,
                     std::optional<ScalarType> dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("csext::gate", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, bool, double,
                                               std::optional<ScalarType>)>();
  return op.call(weight, mask_logits, beta, hard, penalty, dtype);
}

std::tuple<at::Tensor, at::Tensor> call_gate_backward(const at::Tensor& grad,
                                                      const at::Tensor& weight,
                                                      const at::Tensor& mask_logits,
                                                      const at::Tensor& beta, double penalty) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("csext::gate_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, double)>();
  return op.call(grad, weight, mask_logits, beta, penalty);
}

// Autograd of csext::gate_backward, which a backward calls and which builds no node of its own.
// In a backward that builds a graph (create_graph=True: a loss on dL/dw or dL/ds, a
// Hessian-vector product; torch.func's transforms) the gradients are written out in ATen ops,
// differentiable again (forward-mode too), as csext.reference.gate_grads writes them; the
// kernel's output would have no history and the second derivatives would silently be zero.
std::tuple<at::Tensor, at::Tensor> gate_backward_autograd(const at::Tensor& grad,
                                                          const at::Tensor& weight,
                                                          const at::Tensor& mask_logits,
                                                          const at::Tensor& beta, double penalty) {
  const auto requires_grad = [](const at::Tensor& t) { return t.requires_grad(); };
  const auto has_tangent = [](const at::Tensor& t) { return t._fw_grad(/*level=*/0).defined(); };
  const auto any = [&](const auto& test) { return test(grad) || test(weight) || test(mask_logits); };
  if ((at::GradMode::is_enabled() && any(requires_grad)) || any(has_tangent)) {
    // The kernel's checks read beta, which may be a functorch wrapper here; the shapes must
    // agree, or the ops below would broadcast.
    TORCH_CHECK_VALUE(grad.sizes() == weight.sizes(),
                      "csext::gate_backward: grad must have the shape of weight ", weight.sizes(),
                      ", got ", grad.sizes());
    (void)weights_per_logit("csext::gate_backward", "weight", weight, mask_logits);
    const at::Tensor m = at::sigmoid(mask_logits * beta);
    // In the dtype the gate multiplies in: the wider of w's and m's.
    const at::Tensor g = grad.to(at::promote_types(weight.scalar_type(), m.scalar_type()));
    const at::Tensor grad_weight = (g * m).to(weight.scalar_type());
    // A channel's logit gathers the terms of all its weights (sum_to over the broadcast).
    const at::Tensor grad_mask_logits =
        at::sum_to(beta * m * (1 - m) * (g * weight + penalty), mask_logits.sizes());
    return {grad_weight, grad_mask_logits.to(mask_logits.scalar_type())};
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_gate_backward(grad, weight, mask_logits, beta, penalty);
}

// Whether a backward's ops must run through autograd: it builds a graph (create_graph=True,
// torch.func), or a tensor it reads carries a forward-mode tangent (forward over reverse).
bool backward_is_differentiable(std::initializer_list<at::Tensor> tensors) {
  if (at::GradMode::is_enabled()) return true;
  for (const at::Tensor& t : tensors) {
    if (t.defined() && t._fw_grad(/*level=*/0).defined()) return true;
  }
  return false;
}

// Set in a backward pass that is not differentiable (the training loop's): the ops it calls skip
// the autograd layer, whose dispatch for csext::gate_backward cost more than the kernel.
struct BelowAutogradUnless {
  std::optional<at::AutoDispatchBelowADInplaceOrView> guard;
  explicit BelowAutogradUnless(bool differentiable) {
    if (!differentiable) guard.emplace();
  }
};

// (dL/dw, dL/ds) from grad = dL/dw_eff; undefined where not needed.
std::pair<at::Tensor, at::Tensor> gate_grads(const at::Tensor& grad, const at::Tensor& weight,
                                             const at::Tensor& mask_logits,
                                             const at::Tensor& beta, bool hard, double penalty,
                                             bool needs_weight, bool needs_mask_logits) {
  if (!grad.defined()) return {};
  if (hard || !needs_mask_logits) {
    // dL/dw = G * m is the forward pass with G in place of w; the hard mask passes no gradient to s.
    if (!needs_weight) return {};
    return {call_gate(grad, mask_logits, beta, hard, 0.0, weight.scalar_type()), at::Tensor()};
  }
  auto [grad_weight, grad_mask_logits] = call_gate_backward(grad, weight, mask_logits, beta, penalty);
  return {needs_weight ? grad_weight : at::Tensor(), grad_mask_logits};
}

// Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) at level 0, as ATen's kernels
// do it. The tangent of w_eff = w * m is w_t * m + w * m'(s) * s_t: the first term is the gate
// of w_t, the second the mask-logit gradient of gate_backward with s_t as the incoming
// gradient; the hard mask is flat, so s_t adds nothing. Undefined when w and s carry none.
at::Tensor gate_tangent(const at::Tensor& weight, const at::Tensor& mask_logits,
                        const at::Tensor& beta, bool hard, std::optional<ScalarType> dtype) {
  const at::Tensor& w_t = weight._fw_grad(/*level=*/0);
  const at::Tensor& s_t = mask_logits._fw_grad(/*level=*/0);
  const ScalarType out_type = dtype.value_or(weight.scalar_type());
  at::Tensor tangent;
  if (w_t.defined()) tangent = call_gate(w_t, mask_logits, beta, hard, 0.0, out_type);
  if (s_t.defined() && !hard) {
    // w * m'(s) * s_t: per weight, gate_backward's mask gradient with s_t as the incoming one;
    // per channel (s broadcast over a row), the same product broadcast, with no sum.
    const at::Tensor term =
        (s_t.sizes() == weight.sizes()
             ? std::get<1>(call_gate_backward(s_t, weight, mask_logits, beta, 0.0))
             : weight * (beta * at::sigmoid(mask_logits * beta) *
                         (1 - at::sigmoid(mask_logits * beta)) * s_t))
            .to(out_type);
    tangent = tangent.defined() ? tangent + term : term;
  }
  return tangent;
}

// A defined tangent becomes the forward gradient of `out`.
void set_tangent(const at::Tensor& out, const at::Tensor& tangent) {
  if (tangent.defined()) out._set_fw_grad(tangent, /*level=*/0, /*is_inplace_op=*/false);
}

// The tangent of a gated layer's output, layer(x_t, w_eff) + layer(x, w_eff_t) + b_t, from
// `layer(x, w)` (no bias) and the bias's shape for broadcasting against the output.
template <class Layer>
at::Tensor layer_tangent(const at::Tensor& out, const at::Tensor& input, const at::Tensor& w_eff,
                         const at::Tensor& w_eff_t, const std::optional<at::Tensor>& bias,
                         at::IntArrayRef bias_view, const Layer& layer) {
  const at::Tensor& x_t = input._fw_grad(/*level=*/0);
  at::Tensor tangent;
  if (x_t.defined()) tangent = layer(x_t, w_eff);
  if (w_eff_t.defined()) {
    const at::Tensor term = layer(input, w_eff_t);
    tangent = tangent.defined() ? tangent + term : term;
  }
  if (bias.has_value() && bias->defined() && bias->_fw_grad(/*level=*/0).defined()) {
    const at::Tensor b_t = bias->_fw_grad(/*level=*/0).to(out.scalar_type()).view(bias_view);
    tangent = tangent.defined() ? tangent + b_t : at::zeros_like(out) + b_t;
  }
  return tangent;
}

// Each node computes its backward in a static function of its saved state, which apply() calls,
// and which compiled autograd (torch._dynamo.compiled_autograd) gets as a function of IValues
// (apply_with_saved, through call_compiled).

using torch::autograd::SavedVariable;
using torch::dynamo::autograd::CompiledNodeArgs;
using torch::dynamo::autograd::PackedArgs;
using torch::dynamo::autograd::SwapSavedVariables;

// The node of csext::gate. Saves w and s, never m or w_eff: the backward recomputes the mask
// in its single pass. Edges: weight, mask_logits.
struct GateBackward : public torch::autograd::Node {
  SavedVariable weight_, mask_logits_;
  at::Tensor beta_;  // a 0-dim CPU tensor that takes no gradient
  bool hard_ = false;
  double penalty_ = 0.0;

  static variable_list compute(const at::Tensor& grad, const at::Tensor& weight,
                               const at::Tensor& mask_logits, const at::Tensor& beta, bool hard,
                               double penalty, std::array<bool, 2> needs) {
    const BelowAutogradUnless below_autograd(backward_is_differentiable({grad, weight, mask_logits}));
    auto [grad_weight, grad_mask_logits] =
        gate_grads(grad, weight, mask_logits, beta, hard, penalty, needs[0], needs[1]);
    return {grad_weight, grad_mask_logits};
  }

  std::string name() const override { return "csext::GateBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    weight_.reset_data();
    mask_logits_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return compute(grads[0], weight_.unpack(), mask_logits_.unpack(), beta_, hard_, penalty_,
                   {task_should_compute_output(0), task_should_compute_output(1)});
  }

  void compiled_args(CompiledNodeArgs& args) const override {
    args.collect(weight_, false);
    args.collect(mask_logits_, false);
    args.collect(beta_);
    args.collect(hard_);
    args.collect(penalty_);
  }

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& saved) override {
    saved.before(weight_);
    saved.before(mask_logits_);
    saved.before(beta_);
    PackedArgs packed;
    packed.pack(weight_.unpack());
    packed.pack(mask_logits_.unpack());
    packed.pack(beta_);
    packed.pack(hard_);
    packed.pack(penalty_);
    packed.pack(std::array<bool, 2>{task_should_compute_output(0), task_should_compute_output(1)});
    variable_list result = call_compiled(*this, saved, name(), &functional, grads, packed.vec());
    saved.after(weight_);
    saved.after(mask_logits_);
    saved.after(beta_);
    return result;
  }

  static variable_list functional(const variable_list& grads, const std::vector<at::IValue>& args) {
    PackedArgs packed(args);
    const auto weight = packed.unpack<at::Tensor>();
    const auto mask_logits = packed.unpack<at::Tensor>();
    const auto beta = packed.unpack<at::Tensor>();
    const auto hard = packed.unpack<bool>();
    const auto penalty = packed.unpack<double>();
    const auto needs = packed.unpack<std::array<bool, 2>>();
    variable_list result = compute(grads[0], weight, mask_logits, beta, hard, penalty, needs);
    // Compiled autograd wants a tensor for every edge that takes a gradient; the hard mask
    // gives s none (eager autograd skips an undefined one).
    if (needs[1] && !result[1].defined()) result[1] = at::zeros_like(mask_logits);
    return result;
  }
};

at::Tensor gate_autograd(const at::Tensor& weight, const at::Tensor& mask_logits,
                         const at::Tensor& beta, bool hard, double penalty,
                         std::optional<ScalarType> dtype) {
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = call_gate(weight, mask_logits, beta, hard, penalty, dtype);
    set_tangent(out, gate_tangent(weight, mask_logits, beta, hard, dtype));
  }
  if (!torch::autograd::compute_requires_grad(weight, mask_logits)) return out;
  auto node = make_node<GateBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(weight, mask_logits));
  node->weight_ = SavedVariable(weight, /*is_output=*/false);
  node->mask_logits_ = SavedVariable(mask_logits, /*is_output=*/false);
  node->beta_ = beta;
  node->hard_ = hard;
  node->penalty_ = penalty;
  torch::autograd::set_history(out, node);
  return out;
}

// The bias in the dtype of the gated weight, as autocast passes it to linear or conv2d.
std::optional<at::Tensor> bias_like(const std::optional<at::Tensor>& bias, const at::Tensor& w_eff) {
  if (!bias.has_value() || !bias->defined()) return std::nullopt;
  return bias->scalar_type() == w_eff.scalar_type() ? *bias : bias->to(w_eff.scalar_type());
}

// What a gated layer's backward reads besides the incoming gradient; the layer nodes hold one.
// Edges: input, weight, mask_logits, bias.
struct LayerState {
  enum Edge { kInput = 0, kWeight = 1, kMaskLogits = 2, kBias = 3 };
  at::Tensor input, weight, mask_logits, w_eff, beta;
  bool hard = false;
  double penalty = 0.0;
  ScalarType bias_type = ScalarType::Float;
  std::array<bool, 4> needs = {};  // which edges want a gradient
  bool differentiable = false;      // the backward runs through autograd (see BelowAutogradUnless)

  bool needs_w_eff() const { return needs[kWeight] || needs[kMaskLogits]; }

  // The gradients of all four edges from the layer's own (dx, dL/dw_eff, db).
  variable_list finish(at::Tensor grad_input, const at::Tensor& grad_w_eff,
                       const at::Tensor& grad_bias) const {
    variable_list out(4);
    out[kInput] = std::move(grad_input);
    std::tie(out[kWeight], out[kMaskLogits]) = gate_grads(
        grad_w_eff, weight, mask_logits, beta, hard, penalty, needs[kWeight], needs[kMaskLogits]);
    if (grad_bias.defined()) out[kBias] = grad_bias.to(bias_type);
    return out;
  }

  void pack(PackedArgs& packed) const {
    for (const at::Tensor& t : {input, weight, mask_logits, w_eff, beta}) packed.pack(t);
    packed.pack(hard);
    packed.pack(penalty);
    packed.pack(bias_type);
    packed.pack(needs);
  }

  static LayerState unpack(PackedArgs& packed) {
    LayerState state;
    for (at::Tensor* t : {&state.input, &state.weight, &state.mask_logits, &state.w_eff, &state.beta}) {
      *t = packed.unpack<at::Tensor>();
    }
    state.hard = packed.unpack<bool>();
    state.penalty = packed.unpack<double>();
    state.bias_type = packed.unpack<ScalarType>();
    state.needs = packed.unpack<std::array<bool, 4>>();
    return state;
  }
};

// The node of a gated layer: saves x, w, s, w_eff (made below autograd, but a SavedVariable
// so that a second backward fails as ATen's do), and runs `Layer::compute`.
template <class Layer>
struct GatedLayerBackward : public torch::autograd::Node {
  SavedVariable input_, weight_, mask_logits_, w_eff_;
  at::Tensor beta_;
  bool hard_ = false;
  double penalty_ = 0.0;
  ScalarType bias_type_ = ScalarType::Float;
  typename Layer::Params params_;

  std::string name() const override { return Layer::kName; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    input_.reset_data();
    weight_.reset_data();
    mask_logits_.reset_data();
    w_eff_.reset_data();
  }

  // Records what the backward needs (the caller then makes the node the output's grad_fn).
  void attach(const at::Tensor& input, const at::Tensor& weight,
              const at::Tensor& mask_logits, const std::optional<at::Tensor>& bias,
              const at::Tensor& w_eff, const at::Tensor& beta, bool hard, double penalty,
              typename Layer::Params params) {
    set_next_edges(torch::autograd::collect_next_edges(input, weight, mask_logits, bias));
    input_ = SavedVariable(input, /*is_output=*/false);
    weight_ = SavedVariable(weight, /*is_output=*/false);
    mask_logits_ = SavedVariable(mask_logits, /*is_output=*/false);
    w_eff_ = SavedVariable(w_eff, /*is_output=*/false);
    beta_ = beta;
    hard_ = hard;
    penalty_ = penalty;
    if (bias.has_value() && bias->defined()) bias_type_ = bias->scalar_type();
    params_ = std::move(params);
  }

  LayerState state() const {
    return {input_.unpack(), weight_.unpack(), mask_logits_.unpack(), w_eff_.unpack(), beta_,
            hard_, penalty_, bias_type_,
            {task_should_compute_output(0), task_should_compute_output(1),
             task_should_compute_output(2), task_should_compute_output(3)}};
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!grads[0].defined()) return variable_list(4);
    LayerState state = this->state();
    state.differentiable = backward_is_differentiable({grads[0], state.input, state.weight, state.mask_logits});
    if (state.differentiable) {
      // The input gradient (G w_eff) must reach w and s in the next backward, or carry their
      // tangents, and the forward's w_eff has neither: gate again, with autograd.
      state.w_eff = call_gate(state.weight, state.mask_logits, state.beta, state.hard, 0.0,
                              state.w_eff.scalar_type());
    }
    return Layer::compute(grads[0], state, params_);
  }

  void compiled_args(CompiledNodeArgs& args) const override {
    for (const SavedVariable* v : {&input_, &weight_, &mask_logits_, &w_eff_}) args.collect(*v, false);
    args.collect(beta_);
    args.collect(hard_);
    args.collect(penalty_);
    args.collect(bias_type_);
    Layer::collect(args, params_);
  }

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& saved) override {
    for (SavedVariable* v : {&input_, &weight_, &mask_logits_, &w_eff_}) saved.before(*v);
    saved.before(beta_);
    PackedArgs packed;
    state().pack(packed);
    Layer::pack(packed, params_);
    variable_list result = call_compiled(*this, saved, name(), &functional, grads, packed.vec());
    for (SavedVariable* v : {&input_, &weight_, &mask_logits_, &w_eff_}) saved.after(*v);
    saved.after(beta_);
    return result;
  }

  static variable_list functional(const variable_list& grads, const std::vector<at::IValue>& args) {
    PackedArgs packed(args);
    LayerState state = LayerState::unpack(packed);
    state.differentiable = backward_is_differentiable({grads[0], state.input, state.weight, state.mask_logits});
    const typename Layer::Params params = Layer::unpack(packed);
    variable_list result = grads[0].defined() ? Layer::compute(grads[0], state, params) : variable_list(4);
    // As in GateBackward::functional: a tensor for every edge that takes a gradient.
    const std::array<at::Tensor, 4> likes = {state.input, state.weight, state.mask_logits, at::Tensor()};
    for (size_t i = 0; i < 3; ++i) {
      if (state.needs[i] && !result[i].defined()) result[i] = at::zeros_like(likes[i]);
    }
    return result;
  }
};

// A (..., features) tensor as a (rows, features) matrix. reshape({-1, features}) cannot infer
// the rows of an empty tensor with no features (a layer with 0 inputs or outputs). Symbolic
// sizes, so that torch.compile's dynamic shapes stay dynamic through the backward.
at::Tensor as_rows(const at::Tensor& t) {
  const c10::SymIntArrayRef sizes = t.sym_sizes();
  c10::SymInt rows = 1;
  for (size_t i = 0; i + 1 < sizes.size(); ++i) rows *= sizes[i];
  return t.reshape_symint({rows, sizes.back()});
}

// linear(x, w * m, b): dx = G w_eff, dw_eff = G^T x, db = G summed over rows.
struct Linear {
  static constexpr const char* kName = "csext::GatedLinearBackward";
  struct Params {};

  static variable_list compute(const at::Tensor& grad_out, const LayerState& s, const Params&) {
    const BelowAutogradUnless below_autograd(s.differentiable);
    const at::Tensor grad_rows = as_rows(grad_out);
    at::Tensor grad_input, grad_w_eff, grad_bias;
    if (s.needs[LayerState::kInput]) grad_input = grad_out.matmul(s.w_eff);
    if (s.needs_w_eff()) grad_w_eff = grad_rows.t().mm(as_rows(s.input));
    if (s.needs[LayerState::kBias]) grad_bias = grad_rows.sum(0);
    return s.finish(std::move(grad_input), grad_w_eff, grad_bias);
  }
  static void collect(CompiledNodeArgs&, const Params&) {}
  static void pack(PackedArgs&, const Params&) {}
  static Params unpack(PackedArgs&) { return {}; }
};

// conv2d(x, w * m, b): ATen's convolution_backward (cuDNN, oneDNN), then the gate's.
struct Conv2d {
  static constexpr const char* kName = "csext::GatedConv2dBackward";
  struct Params {
    std::vector<int64_t> stride, padding, dilation;
    int64_t groups = 1;
  };

  static variable_list compute(const at::Tensor& grad_out, const LayerState& s, const Params& p) {
    const BelowAutogradUnless below_autograd(s.differentiable);
    const bool needs_bias = s.needs[LayerState::kBias];
    const std::array<int64_t, 1> bias_sizes = {s.w_eff.size(0)};
    auto [grad_input, grad_w_eff, grad_bias] = at::convolution_backward(
        grad_out, s.input, s.w_eff,
        needs_bias ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(), p.stride,
        p.padding, p.dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, p.groups,
        {s.needs[LayerState::kInput], s.needs_w_eff(), needs_bias});
    return s.finish(std::move(grad_input), grad_w_eff, grad_bias);
  }
  static void collect(CompiledNodeArgs& args, const Params& p) {
    args.collect(p.stride);
    args.collect(p.padding);
    args.collect(p.dilation);
    args.collect(p.groups);
  }
  static void pack(PackedArgs& packed, const Params& p) {
    packed.pack(p.stride);
    packed.pack(p.padding);
    packed.pack(p.dilation);
    packed.pack(p.groups);
  }
  static Params unpack(PackedArgs& packed) {
    Params p;
    p.stride = packed.unpack<std::vector<int64_t>>();
    p.padding = packed.unpack<std::vector<int64_t>>();
    p.dilation = packed.unpack<std::vector<int64_t>>();
    p.groups = packed.unpack<int64_t>();
    return p;
  }
};

at::Tensor gated_linear_forward(const at::Tensor& input, const at::Tensor& weight,
                                const at::Tensor& mask_logits, const at::Tensor& beta,
                                const std::optional<at::Tensor>& bias, bool hard, double penalty,
                                std::optional<ScalarType> dtype) {
  const at::Tensor w_eff = call_gate(weight, mask_logits, beta, hard, penalty, dtype);
  return at::linear(input, w_eff, bias_like(bias, w_eff));
}

at::Tensor gated_conv2d_forward(const at::Tensor& input, const at::Tensor& weight,
                                const at::Tensor& mask_logits, const at::Tensor& beta,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                bool hard, double penalty, std::optional<ScalarType> dtype) {
  const at::Tensor w_eff = call_gate(weight, mask_logits, beta, hard, penalty, dtype);
  return at::convolution(input, w_eff, bias_like(bias, w_eff), stride, padding, dilation,
                         /*transposed=*/false, /*output_padding=*/{0, 0}, groups);
}

at::Tensor gated_linear_autograd(const at::Tensor& input, const at::Tensor& weight,
                                 const at::Tensor& mask_logits, const at::Tensor& beta,
                                 const std::optional<at::Tensor>& bias, bool hard, double penalty,
                                 std::optional<ScalarType> dtype) {
  const bool needs_grad = torch::autograd::compute_requires_grad(input, weight, mask_logits, bias);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor w_eff = call_gate(weight, mask_logits, beta, hard, penalty, dtype);
  at::Tensor out = at::linear(input, w_eff, bias_like(bias, w_eff));
  const auto linear = [](const at::Tensor& x, const at::Tensor& w) { return at::linear(x, w); };
  set_tangent(out, layer_tangent(out, input, w_eff, gate_tangent(weight, mask_logits, beta, hard, dtype),
                                 bias, {-1}, linear));
  if (!needs_grad) return out;
  auto node = make_node<GatedLayerBackward<Linear>>();
  node->attach(input, weight, mask_logits, bias, w_eff, beta, hard, penalty, {});
  torch::autograd::set_history(out, node);
  return out;
}

at::Tensor gated_conv2d_autograd(const at::Tensor& input, const at::Tensor& weight,
                                 const at::Tensor& mask_logits, const at::Tensor& beta,
                                 const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                 bool hard, double penalty, std::optional<ScalarType> dtype) {
  const bool needs_grad = torch::autograd::compute_requires_grad(input, weight, mask_logits, bias);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor w_eff = call_gate(weight, mask_logits, beta, hard, penalty, dtype);
  at::Tensor out = at::convolution(input, w_eff, bias_like(bias, w_eff), stride, padding,
                                   dilation, /*transposed=*/false, /*output_padding=*/{0, 0},
                                   groups);
  const auto conv = [&](const at::Tensor& x, const at::Tensor& w) {
    return at::convolution(x, w, std::nullopt, stride, padding, dilation, false, {0, 0}, groups);
  };
  set_tangent(out, layer_tangent(out, input, w_eff, gate_tangent(weight, mask_logits, beta, hard, dtype),
                                 bias, {1, -1, 1, 1}, conv));
  if (!needs_grad) return out;
  auto node = make_node<GatedLayerBackward<Conv2d>>();
  node->attach(input, weight, mask_logits, bias, w_eff, beta, hard, penalty,
               {stride.vec(), padding.vec(), dilation.vec(), groups});
  torch::autograd::set_history(out, node);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(csext, Autograd, m) {
  m.impl("gate", &gate_autograd);
  m.impl("gate_backward", &gate_backward_autograd);
  m.impl("gated_linear", &gated_linear_autograd);
  m.impl("gated_conv2d", &gated_conv2d_autograd);
}

TORCH_LIBRARY_IMPL(csext, CompositeExplicitAutograd, m) {
  m.impl("gated_linear", &gated_linear_forward);
  m.impl("gated_conv2d", &gated_conv2d_forward);
}

// Under torch.vmap the layer ops are their composition: the gate runs once where the weights are
// not batched (its own vmap rule, csext/backends/aten.py, where they are), and ATen's batched linear and
// convolution take the rest. vmap's fallback would instead call the op once per batch element,
// gating the weights each time and, under a torch.func.grad below the vmap, adding the penalty's
// gradient once per element, where the torch backend adds it once.
TORCH_LIBRARY_IMPL(csext, FuncTorchBatched, m) {
  m.impl("gated_linear", &gated_linear_forward);
  m.impl("gated_conv2d", &gated_conv2d_forward);
}

}  // namespace csext
