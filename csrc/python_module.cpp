// The Python extension module diffkern._C. Importing it loads the shared library, whose static
// initialisers register the ops under torch.ops.diffkern. It also holds the two calls that skip
// torch's dispatcher: fused_step_into and linear_step_into, the out= steps into a sampler's own
// buffers (see fused_step_out_direct in ops_common.h). Boxing fused_step's 19 arguments for the
// dispatcher cost ~3.5 us a call from Python, more than a small step itself; these parse theirs in
// well under a microsecond. The profiler still sees each call (RECORD_FUNCTION, under the op's name).
#include <ATen/record_function.h>
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <optional>

#include "ops_common.h"

namespace {

bool tensor_arg(PyObject* obj, const char* name, at::Tensor& out) {
  if (!THPVariable_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "diffkern._C: %s must be a tensor", name);
    return false;
  }
  out = THPVariable_Unpack(obj);
  return true;
}

bool optional_arg(PyObject* obj, const char* name, std::optional<at::Tensor>& out) {
  if (obj == Py_None) return true;
  at::Tensor t;
  if (!tensor_arg(obj, name, t)) return false;
  out = std::move(t);
  return true;
}

bool int_arg(PyObject* obj, const char* name, int64_t& out) {
  if (!PyLong_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "diffkern._C: %s must be an int", name);
    return false;
  }
  out = PyLong_AsLongLong(obj);
  return !(out == -1 && PyErr_Occurred());
}

// Runs ``call`` under the op's name for the profiler; a C++ error becomes a Python RuntimeError.
template <class Call>
PyObject* calling(const char* op, Call&& call) {
  try {
    RECORD_FUNCTION(op, std::vector<c10::IValue>());
    call();
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

// fused_step_into(out, x, model_output, model_output_uncond, guidance_grad, predicted_variance, noise,
//                 coefficients, row, clip, aux, stream_noise, seed, step, sample_offset, aux_out) -> None
PyObject* fused_step_into(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 16) {
    PyErr_SetString(PyExc_TypeError, "fused_step_into takes 16 arguments");
    return nullptr;
  }
  at::Tensor out, x, coefficients;
  std::optional<at::Tensor> model_output, uncond, guidance, variance, noise, aux_out;
  int64_t row = 0, aux = 0, seed = 0, step = 0, sample_offset = 0;
  if (!tensor_arg(args[0], "out", out) || !tensor_arg(args[1], "x", x) ||
      !optional_arg(args[2], "model_output", model_output) || !optional_arg(args[3], "model_output_uncond", uncond) ||
      !optional_arg(args[4], "guidance_grad", guidance) || !optional_arg(args[5], "predicted_variance", variance) ||
      !optional_arg(args[6], "noise", noise) || !tensor_arg(args[7], "coefficients", coefficients) ||
      !int_arg(args[8], "row", row) || !int_arg(args[10], "aux", aux) || !int_arg(args[12], "seed", seed) ||
      !int_arg(args[13], "step", step) || !int_arg(args[14], "sample_offset", sample_offset) ||
      !optional_arg(args[15], "aux_out", aux_out)) {
    return nullptr;
  }
  const bool clip = PyObject_IsTrue(args[9]) == 1, stream_noise = PyObject_IsTrue(args[11]) == 1;
  return calling("diffkern::fused_step.out", [&] {
    diffkern::fused_step_out_direct(x, model_output, uncond, guidance, variance, noise, coefficients, std::nullopt, row,
                                    clip, aux, stream_noise, seed, step, sample_offset, 0, std::nullopt, out, aux_out);
    // what the dispatcher's out= op does for autograd: a tensor saved for a backward and written
    // here is then refused by that backward instead of read with its new values
    torch::autograd::impl::bump_version(out);
    if (aux_out.has_value()) torch::autograd::impl::bump_version(*aux_out);
  });
}

bool tensor_list(PyObject* obj, const char* name, std::vector<at::Tensor>& out) {
  if (!PyList_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "linear_step_into: %s must be a list of tensors", name);
    return false;
  }
  const Py_ssize_t n = PyList_GET_SIZE(obj);
  out.resize(n);
  for (Py_ssize_t i = 0; i < n; ++i)
    if (!tensor_arg(PyList_GET_ITEM(obj, i), name, out[i])) return false;
  return true;
}

// linear_step_into(inputs, noise, coefficients, row, outputs, x0, clip, stream_noise, seed, step,
//                  sample_offset, out) -> None; inputs and out are lists of tensors
PyObject* linear_step_into(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 12) {
    PyErr_SetString(PyExc_TypeError, "linear_step_into takes 12 arguments");
    return nullptr;
  }
  std::vector<at::Tensor> inputs, out;
  std::optional<at::Tensor> noise;
  at::Tensor coefficients;
  int64_t row = 0, outputs = 0, seed = 0, step = 0, sample_offset = 0;
  if (!tensor_list(args[0], "inputs", inputs) || !optional_arg(args[1], "noise", noise) ||
      !tensor_arg(args[2], "coefficients", coefficients) || !int_arg(args[3], "row", row) ||
      !int_arg(args[4], "outputs", outputs) || !int_arg(args[8], "seed", seed) || !int_arg(args[9], "step", step) ||
      !int_arg(args[10], "sample_offset", sample_offset) || !tensor_list(args[11], "out", out)) {
    return nullptr;
  }
  const bool x0 = PyObject_IsTrue(args[5]) == 1, clip = PyObject_IsTrue(args[6]) == 1;
  const bool stream_noise = PyObject_IsTrue(args[7]) == 1;
  return calling("diffkern::linear_step.out", [&] {
    diffkern::linear_step_out_direct(inputs, noise, coefficients, row, outputs, x0, clip, stream_noise, seed, step,
                                     sample_offset, 0, std::nullopt, out);
    for (const at::Tensor& t : out) torch::autograd::impl::bump_version(t);
  });
}

PyMethodDef methods[] = {
    {"fused_step_into", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fused_step_into)), METH_FASTCALL,
     "fused_step.out into the caller's buffers without torch's dispatcher (diffkern's run engine only)"},
    {"linear_step_into", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(linear_step_into)), METH_FASTCALL,
     "linear_step.out into the caller's buffers without torch's dispatcher (diffkern's samplers only)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "diffkern compiled ops", -1, methods};
  return PyModule_Create(&module);
}
