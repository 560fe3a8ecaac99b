#!/usr/bin/env bash
# Wheels the GPU image lacks (no network there) for bench/gpu_train.py and bench/zero3_offload.py, into .whl/:
# liger-kernel, deepspeed (built here: PyPI has its sdist only) and those of deepspeed's requirements that are not
# in the image's package list (/work/.library/device/KINDS.md). Python 3.12, x86-64. bench/gpu_check.sh installs
# them there with pip --no-index --target /tmp/site; the device run must name .whl in carry.
# Usage, from the repository root on a machine that reaches PyPI:  bash bench/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
python=${PYTHON:-.venv/bin/python}  # needs torch for the deepspeed build (no build isolation)
dest=.whl
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")" "$dest"
grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >>"$exclude"

# Versions as in the venv the CPU tests run (deepspeed 0.19.8's pydantic). typing-extensions is in the image but
# pydantic 2.14 needs >= 4.16; a newer copy shadowing the image's is harmless.
binary=(
  liger-kernel==0.8.5
  hjson==3.1.0
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
)
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${binary[@]}"

# DS_BUILD_OPS=0: no C++ op precompiled; ZeRO with our torch AdamW needs none.
if ! compgen -G "$dest/deepspeed-0.19.8-*.whl" >/dev/null; then
  DS_BUILD_OPS=0 "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$dest" deepspeed==0.19.8
fi

ls -l "$dest"
du -sh "$dest"
