"""What scripts/install.sh can skip. Standard library only (it runs before anything is installed).

    python scripts/install_state.py deps REQ...   exit 0 if every requirement (pip syntax) is installed,
                                                  else say which is not
    python scripts/install_state.py inputs        print the hash of what the C++ extension is built from
    python scripts/install_state.py check HASH    exit 0 if this checkout is installed, its extension imports
                                                  and the stamp says it was built from HASH (else say why)
    python scripts/install_state.py write HASH    record that the extension now in place was built from HASH

The stamp, build/fused_posenc_ext.stamp, holds the hash of the build's inputs (csrc/**, setup.py,
pyproject.toml, CMakeLists.txt, torch's version, the Python executable, the build switches) and the path,
size and mtime of the built .so, so a .so rebuilt by hand or by another tool is not taken for ours.
Run it as a script (not -m, not from the repository root on sys.path): the import checks must see what
the environment has installed, not the source tree next to the current directory.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "fused_posenc")
STAMP = os.path.join(ROOT, "build", "fused_posenc_ext.stamp")
INPUT_FILES = ("setup.py", "pyproject.toml", "CMakeLists.txt")
BUILD_ENV = ("FUSED_POSENC_SKIP_EXT_BUILD", "FUSED_POSENC_SKIP_CUDA_BUILD", "FUSED_POSENC_CUDA_ARCHS",
             "CUDA_HOME", "CUDA_PATH", "CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS")


def _requirement(text):
    try:
        from packaging.requirements import Requirement
    except ImportError:  # a fresh venv: pip's own copy
        from pip._vendor.packaging.requirements import Requirement
    return Requirement(text)


def deps(reqs):
    """0 if every requirement is installed at an allowed version; else 1, printing the first one that is not."""
    for text in reqs:
        req = _requirement(text)
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            print(f"{req.name} is not installed")
            return 1
        if not req.specifier.contains(version, prereleases=True):
            print(f"{req.name} {version} is installed, {text} is wanted")
            return 1
    return 0


def _torch_version():
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def inputs_hash():
    h = hashlib.sha256()

    def add(name, data):
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)

    files = sorted(p for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True) if os.path.isfile(p))
    files += [os.path.join(ROOT, f) for f in INPUT_FILES if os.path.isfile(os.path.join(ROOT, f))]
    for path in files:
        with open(path, "rb") as f:
            add(os.path.relpath(path, ROOT), f.read())
    add("torch", _torch_version().encode())
    add("python", sys.executable.encode())
    add("nvcc", str(shutil.which("nvcc")).encode())
    for var in BUILD_ENV:
        add("env:" + var, os.environ.get(var, "\0unset").encode())
    return h.hexdigest()


def _skip_ext():
    return os.environ.get("FUSED_POSENC_SKIP_EXT_BUILD", "0").lower() in ("1", "true", "yes", "on")


def _built_so():
    """The extension's .so in this checkout (the one an editable install imports), or None."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(PKG, "_C" + suffix)
        if os.path.isfile(path):
            return path
    return None


def _so_identity(path):
    if path is None:
        return "no-extension"
    st = os.stat(path)
    return f"{os.path.relpath(path, ROOT)} {st.st_size} {st.st_mtime_ns}"


def _stamp_text(inputs):
    return f"{inputs}\n{_so_identity(None if _skip_ext() else _built_so())}\n"


def check(inputs):
    """None if nothing needs building, else why it does."""
    spec = importlib.util.find_spec("fused_posenc")  # finds the package without running it
    if spec is None or spec.origin is None:
        return "fused_posenc is not installed in this environment"
    if os.path.realpath(os.path.dirname(spec.origin)) != os.path.realpath(PKG):
        return f"the installed fused_posenc is {os.path.dirname(spec.origin)}, not this checkout"
    if not _skip_ext():
        so = _built_so()
        if so is None:
            return "the C++ extension is not built"
        try:  # `import fused_posenc._C` without running the package's __init__
            import torch  # noqa: F401  (the extension links against it)

            ext_spec = importlib.util.spec_from_file_location("fused_posenc._C", so)
            ext_spec.loader.exec_module(importlib.util.module_from_spec(ext_spec))
        except Exception as e:
            return f"the C++ extension does not import ({type(e).__name__}: {e})"
    try:
        with open(STAMP) as f:
            recorded = f.read()
    except OSError:
        return "no build stamp (first build here)"
    if recorded.split("\n", 1)[0] != inputs:
        return "csrc/, the build files, torch, Python or a build switch changed since the last build"
    if recorded != _stamp_text(inputs):
        return "the extension in place is not the one the stamp records (rebuilt elsewhere)"
    return None


def main(argv):
    cmd, args = argv[0], argv[1:]
    if cmd == "deps":
        return deps(args)
    if cmd == "inputs":
        print(inputs_hash())
        return 0
    if cmd == "check":
        why = check(args[0])
        if why is not None:
            print(why)
            return 1
        return 0
    if cmd == "write":
        os.makedirs(os.path.dirname(STAMP), exist_ok=True)
        with open(STAMP, "w") as f:
            f.write(_stamp_text(args[0]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
