"""Toolchain chatter off: a leaf module (the CLI and the benchmarks both use it)."""

import logging


def quiet_toolchains():
    """Toolchain chatter (deprecation warnings, exporter registration notes, runtime info logs) is not the user's
    problem and would bury the one line that is; --debug keeps all of it."""
    import warnings

    warnings.simplefilter("ignore")
    for name in ("torch", "torchao", "executorch", "onnxscript", "onnx_ir", "coremltools"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    except ImportError:
        pass
