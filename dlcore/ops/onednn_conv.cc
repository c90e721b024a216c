// NHWC float32 2-D convolution (forward, backward-data, backward-weights) as XLA FFI handlers calling oneDNN.
//
// Layouts are those of lax.conv_general_dilated with dimension numbers ('NHWC', 'HWIO', 'NHWC'): images
// (N, H, W, C), kernels (KH, KW, C / groups, O), outputs (N, OH, OW, O); output feature o belongs to group
// o / (O / groups). Padding is explicit (top, bottom, left, right), non-negative; no dilation.
//
// oneDNN picks its own weight layout (format_tag::any); the kernel is reordered into it (forward, backward-data)
// or out of it (backward-weights) on every call, which costs a pass over the weights only. Primitives are built
// once per geometry and cached; executions are serialised, since each one already uses every OpenMP thread.

#include <Python.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

struct Geometry {
  int64_t n, h, w, c, o, oh, ow, kh, kw, groups, sh, sw, pt, pb, pl, pr;

  auto key() const { return std::make_tuple(n, h, w, c, o, oh, ow, kh, kw, groups, sh, sw, pt, pb, pl, pr); }
  memory::desc image() const { return {{n, c, h, w}, memory::data_type::f32, tag::nhwc}; }
  memory::desc output() const { return {{n, o, oh, ow}, memory::data_type::f32, tag::nhwc}; }
  memory::dims weight_dims() const {
    if (groups == 1) return {o, c, kh, kw};
    return {groups, o / groups, c / groups, kh, kw};
  }
  // The kernel as XLA stores it, HWIO with the groups' output features contiguous.
  memory::desc user_weights() const {
    const int64_t ig = c / groups, og = o / groups;
    if (groups == 1) return {weight_dims(), memory::data_type::f32, memory::dims{1, o, kw * ig * o, ig * o}};
    return {weight_dims(), memory::data_type::f32, memory::dims{og, 1, o, kw * ig * o, ig * o}};
  }
  memory::desc any_weights() const { return {weight_dims(), memory::data_type::f32, tag::any}; }
  memory::dims strides() const { return {sh, sw}; }
  memory::dims pad_l() const { return {pt, pl}; }
  memory::dims pad_r() const { return {pb, pr}; }
};

enum class Kind { kForward, kBackwardData, kBackwardWeights };

struct Plan {
  dnnl::primitive conv;
  memory::desc weights;  // the primitive's weight layout
  bool reorder;          // whether it differs from the user's
  dnnl::reorder weight_reorder;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

std::mutex& Lock() {
  static std::mutex lock;
  return lock;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.image(),
      g.any_weights(), g.output(), g.strides(), g.pad_l(), g.pad_r());
}

dnnl::reorder Reorder(const memory::desc& from, const memory::desc& to) {
  return dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), from, Engine(), to));
}

// Called with Lock() held.
Plan& GetPlan(Kind kind, const Geometry& g) {
  static std::map<std::tuple<int, decltype(g.key())>, std::unique_ptr<Plan>> plans;
  auto& slot = plans[std::make_tuple(static_cast<int>(kind), g.key())];
  if (slot) return *slot;
  auto plan = std::make_unique<Plan>();
  auto fwd = ForwardDesc(g);
  memory::desc user = g.user_weights();
  if (kind == Kind::kForward) {
    plan->conv = dnnl::convolution_forward(fwd);
    plan->weights = fwd.weights_desc();
    plan->reorder = plan->weights != user;
    if (plan->reorder) plan->weight_reorder = Reorder(user, plan->weights);
  } else if (kind == Kind::kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(Engine(), dnnl::algorithm::convolution_direct, g.image(),
                                                       g.any_weights(), g.output(), g.strides(), g.pad_l(),
                                                       g.pad_r(), fwd);
    plan->conv = dnnl::convolution_backward_data(pd);
    plan->weights = pd.weights_desc();
    plan->reorder = plan->weights != user;
    if (plan->reorder) plan->weight_reorder = Reorder(user, plan->weights);
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(Engine(), dnnl::algorithm::convolution_direct,
                                                          g.image(), g.any_weights(), g.output(), g.strides(),
                                                          g.pad_l(), g.pad_r(), fwd);
    plan->conv = dnnl::convolution_backward_weights(pd);
    plan->weights = pd.diff_weights_desc();
    plan->reorder = plan->weights != user;
    if (plan->reorder) plan->weight_reorder = Reorder(plan->weights, user);
  }
  slot = std::move(plan);
  return *slot;
}

ffi::Error Run(Kind kind, const Geometry& g, float* image, float* weights, float* output) {
  if (g.groups <= 0 || g.c % g.groups != 0 || g.o % g.groups != 0)
    return ffi::Error::InvalidArgument("channels not divisible by groups");
  try {
    std::lock_guard<std::mutex> guard(Lock());
    Plan& plan = GetPlan(kind, g);
    dnnl::stream stream(Engine());
    memory image_mem(g.image(), Engine(), image);
    memory output_mem(g.output(), Engine(), output);
    memory user_weights(g.user_weights(), Engine(), weights);
    memory prim_weights = plan.reorder ? memory(plan.weights, Engine()) : user_weights;
    if (kind == Kind::kForward) {
      if (plan.reorder) plan.weight_reorder.execute(stream, user_weights, prim_weights);
      plan.conv.execute(stream, {{DNNL_ARG_SRC, image_mem}, {DNNL_ARG_WEIGHTS, prim_weights},
                                 {DNNL_ARG_DST, output_mem}});
    } else if (kind == Kind::kBackwardData) {
      if (plan.reorder) plan.weight_reorder.execute(stream, user_weights, prim_weights);
      plan.conv.execute(stream, {{DNNL_ARG_DIFF_SRC, image_mem}, {DNNL_ARG_WEIGHTS, prim_weights},
                                 {DNNL_ARG_DIFF_DST, output_mem}});
    } else {
      plan.conv.execute(stream, {{DNNL_ARG_SRC, image_mem}, {DNNL_ARG_DIFF_WEIGHTS, prim_weights},
                                 {DNNL_ARG_DIFF_DST, output_mem}});
      if (plan.reorder) plan.weight_reorder.execute(stream, prim_weights, user_weights);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32, 4>;
using ResultF32 = ffi::ResultBuffer<ffi::F32, 4>;

ffi::Error Forward(F32 x, F32 w, ResultF32 y, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                   int64_t pr, int64_t groups) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  Geometry g{xd[0], xd[1], xd[2], xd[3], yd[3], yd[1], yd[2], wd[0], wd[1], groups, sh, sw, pt, pb, pl, pr};
  return Run(Kind::kForward, g, x.typed_data(), w.typed_data(), y->typed_data());
}

ffi::Error BackwardData(F32 dy, F32 w, ResultF32 dx, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                        int64_t pr, int64_t groups) {
  auto xd = dx->dimensions(), wd = w.dimensions(), yd = dy.dimensions();
  Geometry g{xd[0], xd[1], xd[2], xd[3], yd[3], yd[1], yd[2], wd[0], wd[1], groups, sh, sw, pt, pb, pl, pr};
  return Run(Kind::kBackwardData, g, dx->typed_data(), w.typed_data(), dy.typed_data());
}

ffi::Error BackwardWeights(F32 x, F32 dy, ResultF32 dw, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                           int64_t pl, int64_t pr, int64_t groups) {
  auto xd = x.dimensions(), wd = dw->dimensions(), yd = dy.dimensions();
  Geometry g{xd[0], xd[1], xd[2], xd[3], yd[3], yd[1], yd[2], wd[0], wd[1], groups, sh, sw, pt, pb, pl, pr};
  return Run(Kind::kBackwardWeights, g, x.typed_data(), dw->typed_data(), dy.typed_data());
}

}  // namespace

#define CONV_ATTRS                                                                                        \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top").Attr<int64_t>("pad_bottom") \
      .Attr<int64_t>("pad_left").Attr<int64_t>("pad_right").Attr<int64_t>("groups")

XLA_FFI_DEFINE_HANDLER_SYMBOL(DlcoreConvForward, Forward,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DlcoreConvBackwardData, BackwardData,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DlcoreConvBackwardWeights, BackwardWeights,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>() CONV_ATTRS);

// ------------------------------------------------------------------------------------------ Python module

static PyObject* Handlers(PyObject*, PyObject*) {
  PyObject* dict = PyDict_New();
  if (dict == nullptr) return nullptr;
  const std::pair<const char*, void*> handlers[] = {
      {"forward", reinterpret_cast<void*>(DlcoreConvForward)},
      {"backward_data", reinterpret_cast<void*>(DlcoreConvBackwardData)},
      {"backward_weights", reinterpret_cast<void*>(DlcoreConvBackwardWeights)},
  };
  for (const auto& [name, fn] : handlers) {
    PyObject* capsule = PyCapsule_New(fn, nullptr, nullptr);
    if (capsule == nullptr || PyDict_SetItemString(dict, name, capsule) != 0) {
      Py_XDECREF(capsule);
      Py_DECREF(dict);
      return nullptr;
    }
    Py_DECREF(capsule);
  }
  return dict;
}

static PyObject* Version(PyObject*, PyObject*) {
  const dnnl_version_t* v = dnnl_version();
  return Py_BuildValue("(iii)", v->major, v->minor, v->patch);
}

static PyMethodDef kMethods[] = {
    {"handlers", Handlers, METH_NOARGS, "The FFI handlers by name, as PyCapsules."},
    {"version", Version, METH_NOARGS, "The loaded oneDNN's (major, minor, patch)."},
    {nullptr, nullptr, 0, nullptr},
};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_onednn", "oneDNN convolutions as XLA FFI handlers.", -1,
                              kMethods};

PyMODINIT_FUNC PyInit__onednn() { return PyModule_Create(&kModule); }
