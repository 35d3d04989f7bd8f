"""Files from Debian packages, without root: the installed copy if there is one, else an unpacked download.

Fashion-MNIST (`dataset-fashion-mnist`) and the colour-emoji font (`fonts-noto-color-emoji`) ship as Debian
packages. Installing them needs root, which a CI runner or a shared machine may not grant; `apt-get download`
(fetches the .deb into the current directory as any user) and `dpkg-deb -x` (unpacks it anywhere) do not. The
unpacked tree is kept under `cache_dir`, so the download happens once.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

# Where an installed package's files live; a test points it at an empty folder to force the download path.
SYSTEM_ROOT = "/"


class PackageError(RuntimeError):
    """A package's files could not be found or fetched; the message says how to provide them."""


def package_path(package: str, relpath: str, cache_dir: str | os.PathLike) -> str:
    """The path of `relpath` (e.g. 'usr/share/datasets/fashion-mnist') from `package`: the installed one if
    present, else from `<cache_dir>/<package>/root` after fetching and unpacking the package there once."""
    installed = os.path.join(SYSTEM_ROOT, relpath)
    if os.path.exists(installed):
        return installed
    work = os.path.join(os.fspath(cache_dir), package)
    unpacked = os.path.join(work, "root", relpath)
    if os.path.exists(unpacked):
        return unpacked
    how = f"install it (`sudo apt-get install {package}`) or put its files at {installed}"
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise PackageError(f"{package} is not installed and `{tool}` is not available to fetch it; {how}")
    os.makedirs(work, exist_ok=True)
    debs = _debs(work, package)  # one left by an earlier run that stopped before unpacking is reused
    if not debs:
        _run(["apt-get", "download", package], work, package, how)
        debs = _debs(work, package)
    if not debs:
        raise PackageError(f"`apt-get download {package}` wrote no .deb into {work}; {how}")
    # Unpack into a fresh folder and rename it into place: an interrupted unpack never looks complete.
    partial = os.path.join(work, "root.partial")
    shutil.rmtree(partial, ignore_errors=True)
    _run(["dpkg-deb", "-x", debs[-1], partial], work, package, how)
    shutil.rmtree(os.path.join(work, "root"), ignore_errors=True)
    os.rename(partial, os.path.join(work, "root"))
    if not os.path.exists(unpacked):
        raise PackageError(f"{package} unpacked into {work}/root has no {relpath}; {how}")
    return unpacked


def _debs(folder: str, package: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, f"{package}_*.deb")))


def _run(cmd: list[str], cwd: str, package: str, how: str) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, timeout=600)
    except subprocess.CalledProcessError as e:
        lines = [line for line in (e.stderr or e.stdout or "").splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"exit code {e.returncode}"
        raise PackageError(f"`{' '.join(cmd)}` failed for {package} ({reason}); {how}") from None
    except subprocess.TimeoutExpired:
        raise PackageError(f"`{' '.join(cmd)}` took over 10 minutes for {package}; {how}") from None
