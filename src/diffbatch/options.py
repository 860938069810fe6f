"""Names of the load-time choices, torch-free so the CLI and server can list them without importing torch."""

AUTO_DTYPE = "auto"  # the device's fastest exact dtype (adapters.loading.resolve_dtype)
DTYPE_NAMES = (AUTO_DTYPE, "float32", "float16", "bfloat16")
BACKENDS = ("torch", "openvino")  # what runs the models (adapters/openvino.py)
