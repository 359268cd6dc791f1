"""Toolchain chatter off: a leaf module (the CLI and the benchmarks both use it)."""

import logging


def quiet_toolchains():
    """Toolchain chatter (deprecation warnings, exporter registration notes, runtime info logs) is not the user's
    problem and would bury the one line that is; --debug keeps all of it."""
    import sys
    import warnings

    from pit_export.compat.versions import CompatWarning

    warnings.simplefilter("ignore")
    # except ours: a toolchain outside the versions a compat patch was written for is the user's business, one line
    warnings.simplefilter("default", CompatWarning)
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CompatWarning):
            sys.stderr.write(f"warning: {message}\n")
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    for name in ("torch", "torchao", "executorch", "onnxscript", "onnx_ir", "coremltools"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    except ImportError:
        pass
