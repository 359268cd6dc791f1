"""Stand-in CUDA libraries for the aarch64 torch wheel inside the emulated root.

The aarch64 torch wheel on the registry is a CUDA build: libtorch.so needs libtorch_cuda.so, which needs cudart,
cublas, cudnn, nccl, ... (~2.9 GB of vendor wheels, some not on the registry). ExecuTorch's Python runtime links
libtorch but never calls CUDA. Each missing library is replaced by a small aarch64 shared object with the same soname
that defines exactly the symbols (and symbol versions) the torch and ExecuTorch libraries import from it; every
function returns 100 (cudaErrorNoDevice / CUDA_ERROR_NO_DEVICE), so torch.cuda.is_available() is False and no CPU
code path changes. The CPU kernels (libtorch_cpu, ExecuTorch, XNNPACK) are the wheels' own, byte for byte.

    python cuda_stubs.py ROOT OUTDIR CC     (ROOT: the emulated userland with torch/executorch installed)
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SYSTEM_DIRS = ("lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu")
VENDOR_PREFIXES = ("libcu", "libnv", "libnccl")  # CUDA and NVIDIA libraries: the only ones stubbed


def dyn_symbols(lib: Path) -> tuple[set[str], list[tuple[str, str, str]]]:
    """(defined names, [(name, version, type)] of undefined non-weak references)."""
    out = subprocess.run(["readelf", "--dyn-syms", "-W", str(lib)], capture_output=True, text=True).stdout
    defined, undefined = set(), []
    for line in out.splitlines():
        f = line.split()
        if len(f) < 8 or not f[0].endswith(":"):
            continue
        name, _, version = f[7].partition("@")
        if f[6] == "UND":
            if f[4] != "WEAK" and name:
                undefined.append((name, version.lstrip("@"), f[3]))
        else:
            defined.add(name)
    return defined, undefined


def needed(lib: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", "-W", str(lib)], capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)


def version_files(lib: Path) -> dict[str, str]:
    """Version name -> the file that must provide it (the .gnu.version_r section)."""
    out = subprocess.run(["readelf", "-V", "-W", str(lib)], capture_output=True, text=True).stdout
    files, current = {}, None
    for line in out.splitlines():
        m = re.search(r"File: (\S+)", line)
        if m:
            current = m.group(1)
        m = re.search(r"Name: (\S+)", line)
        if m and current:
            files[m.group(1)] = current
    return files


def main(root: Path, outdir: Path, cc: str) -> None:
    site = root / "usr/local/lib/python3.11/dist-packages"
    libs = sorted(p for p in (site / "torch/lib").glob("*.so*") if p.is_file())
    libs += sorted(p for p in (site / "executorch").rglob("*.so") if p.is_file())
    present = {p.name for p in libs}
    # stand-ins from an earlier run are in the system folder too: not counted as present (the root has no others)
    system = [p for d in SYSTEM_DIRS for p in (root / d).glob("*.so*") if p.is_file()]
    system = [p for p in system if not p.name.startswith(VENDOR_PREFIXES)]
    present |= {p.name for p in system}
    defined: set[str] = set()
    refs: list[tuple[str, str, str]] = []
    vfiles: dict[str, str] = {}
    missing_libs: set[str] = set()
    for lib in libs:
        d, u = dyn_symbols(lib)
        defined |= d
        refs += u
        vfiles |= version_files(lib)
        missing_libs |= {n for n in needed(lib) if n not in present}
    for lib in system + [root / "usr/bin/python3.11"]:
        defined |= dyn_symbols(lib)[0]
    by_lib: dict[str, dict[str, tuple[str, str]]] = {name: {} for name in sorted(missing_libs)}
    orphans: dict[str, str] = {}
    for name, version, kind in refs:
        target = vfiles.get(version) if version else None
        if target in by_lib:
            by_lib[target][name] = (version, kind)
        elif not version and name not in defined:
            orphans[name] = kind
    if not by_lib:
        print("no missing libraries: nothing to stub")
        return
    foreign = [n for n in by_lib if not n.startswith(VENDOR_PREFIXES)]
    if foreign:
        sys.exit(f"missing from the root, not CUDA libraries (install them instead): {' '.join(foreign)}")
    # unversioned references nobody defines (libcuda, nccl, cufile, ...) could come from any of the libraries whose
    # references are all unversioned: each of those defines them all (the first one loaded in scope wins)
    plain = [n for n in by_lib if all(not v for v, _ in by_lib[n].values())] or list(by_lib)
    for lib in plain:
        for name, kind in orphans.items():
            by_lib[lib].setdefault(name, ("", kind))
    outdir.mkdir(parents=True, exist_ok=True)
    for soname, syms in by_lib.items():
        c = ['static const char unavailable[] = "CUDA is not available (stub library)";']
        versions: dict[str, list[str]] = {}
        for i, (name, (version, kind)) in enumerate(sorted(syms.items())):
            if kind == "OBJECT":
                c.append(f'__attribute__((aligned(16))) char o{i}[256] __asm__("{name}");')
            elif kind == "TLS":
                c.append(f'__thread char t{i}[64] __asm__("{name}");')
            elif name.endswith(("GetErrorString", "GetErrorName")) or name.endswith("GetString"):
                c.append(f'const char *f{i}(void) __asm__("{name}");\nconst char *f{i}(void) {{ return unavailable; }}')
            else:
                c.append(f'long f{i}(void) __asm__("{name}");\nlong f{i}(void) {{ return 100; }}')
            versions.setdefault(version or soname, []).append(name)
        src, vs = outdir / f"{soname}.c", outdir / f"{soname}.map"
        src.write_text("\n".join(c) + "\n")
        nodes = [f"{v} {{ global: " + " ".join(f'"{n}";' for n in ns) for v, ns in versions.items()]
        vs.write_text(" };\n".join(nodes) + " local: *; };\n")  # the last node hides everything else
        cmd = [cc, "-shared", "-fPIC", "-O1", "-nostdlib", f"-Wl,-soname,{soname}"]
        cmd += [f"-Wl,--version-script={vs}"] if versions else []
        subprocess.run(cmd + ["-o", str(outdir / soname), str(src)], check=True)
        print(f"{soname}: {len(syms)} symbols")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
