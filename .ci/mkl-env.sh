#!/usr/bin/env bash
# Makes `cargo build --features mkl` (Candle's CPU matmul through Intel MKL) possible without a
# system MKL: MKL's static libraries, headers and OpenMP runtime come from their Python package
# index wheels (mkl-static, mkl-include, intel-openmp), nothing downloaded at build time.
#
# Usage (source it, do not execute it):
#     source .ci/mkl-env.sh
#     cargo build --release --features mkl --examples
#
# Once per machine it installs the wheels into a venv under $MKL_ENV_HOME (default
# ~/.cache/candle-parallel-mkl; ~700 MB). Then it exports MKLROOT (where intel-mkl-src finds
# the libraries), an rpath to the OpenMP runtime for the built binaries, and a target directory
# of its own (CARGO_TARGET_DIR, default target/mkl) so that the default build's stays valid.

set -u
MKL_ENV_HOME=${MKL_ENV_HOME:-$HOME/.cache/candle-parallel-mkl}
if [ ! -e "$MKL_ENV_HOME/mkl-ok" ]; then
    python3 -m venv "$MKL_ENV_HOME" &&
        "$MKL_ENV_HOME/bin/pip" install --quiet --disable-pip-version-check \
            mkl-static mkl-include intel-openmp &&
        touch "$MKL_ENV_HOME/mkl-ok"
fi
if [ -e "$MKL_ENV_HOME/mkl-ok" ]; then
    export MKLROOT="$MKL_ENV_HOME"
    export RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,-rpath,$MKL_ENV_HOME/lib"
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/mkl}
else
    echo "mkl-env: installing mkl-static, mkl-include and intel-openmp from PyPI failed" >&2
fi
set +u
