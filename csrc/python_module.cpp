// The Python extension module diffkern._C. It holds no Python functions: importing it loads the
// shared library, whose static initialisers register the ops under torch.ops.diffkern.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "diffkern compiled ops", -1, nullptr};
  return PyModule_Create(&module);
}
