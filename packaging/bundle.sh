# shellcheck shell=bash
# Offline installation bundles (sourced by install.sh; issue 15).
#
#   ./install.sh --make-bundle DIR [--arch aarch64|x86_64] [--python 3.11]   (on a connected machine)
#   ./install.sh --from-bundle DIR --role ROLE [--systemd]                  (on a Pi, no network at all)
#
# DIR holds everything every role needs, so one bundle serves every Pi of a site:
#   wheels/         the wheels for the target architecture and Python: the CPU torch build, every dependency
#                   with the train extra, animal-mnist, setuptools (pip builds edgeprune itself from the source)
#   debs/           the Debian packages install.sh would install, with their dependencies (apt-get download)
#   edgeprune-src.tar.gz   this source tree (install.sh included)
#   MANIFEST        target arch and Python, torch spec, when and from which commit it was made
#
# Environment: EDGEPRUNE_TORCH_INDEX (default https://download.pytorch.org/whl/cpu, where the CPU build lives;
# empty: only the indexes and find-links of pip's own configuration), EDGEPRUNE_BUNDLE_DEBS (default: every
# role's Debian packages).

BUNDLE_DEBS_DEFAULT="python3 python3-venv mosquitto mosquitto-clients sqlite3 chrony"
ANIMAL_MNIST_SPEC="animal-mnist==0.4"

# torch_spec_for: the CPU torch build. PyPI's torch 2.13.0 is a CUDA build on x86_64 *and* on aarch64 (its
# aarch64 wheel needs cuda-toolkit, 3 GB with it), so the +cpu build from PyTorch's CPU index, on both.
torch_spec_for() {
  local version="${TORCH_SPEC#torch==}"
  echo "torch==${version%+cpu}+cpu"
}

# deb_arch ARCH: Debian's name for ARCH.
deb_arch() { case "$1" in aarch64) echo arm64 ;; x86_64) echo amd64 ;; *) echo "$1" ;; esac; }

# project_requirements EXTRA...: pyproject.toml's dependencies and those of the given extras, one a line.
project_requirements() {
  python3 - "$HERE/pyproject.toml" "$@" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(project["dependencies"] + [r for extra in sys.argv[2:] for r in project["optional-dependencies"][extra]]))
PY
}

# make_bundle DIR ARCH PYVER
make_bundle() {
  local dir="$1" arch="$2" pyver="$3" torch
  mkdir -p "$dir/wheels" "$dir/debs"
  dir="$(cd "$dir" && pwd)"
  torch="$(torch_spec_for "$arch")"
  local target=(--only-binary=:all: --python-version "$pyver" --implementation cp
                --abi "cp${pyver/./}" --abi abi3 --abi none --platform "linux_$arch" --platform "manylinux2014_$arch")
  local glibc  # a Pi's Debian bookworm has glibc 2.36: every manylinux wheel up to that runs there
  for glibc in $(seq 17 36); do target+=(--platform "manylinux_2_${glibc}_$arch"); done
  local index=() torch_index="${EDGEPRUNE_TORCH_INDEX-https://download.pytorch.org/whl/cpu}"
  [ -n "$torch_index" ] && index=(--extra-index-url "$torch_index")
  local pip=(python3 -m pip --disable-pip-version-check)
  say "bundle: wheels for $arch, CPython $pyver ($torch, every dependency with the train extra)"
  "${pip[@]}" download --progress-bar on -d "$dir/wheels" "${target[@]}" "${index[@]}" \
    "$torch" "setuptools>=68" wheel -r <(project_requirements train)
  say "bundle: $ANIMAL_MNIST_SPEC (without its TensorFlow loader's dependencies, as install.sh does)"
  "${pip[@]}" download -q -d "$dir/wheels" --no-deps --only-binary=:all: "$ANIMAL_MNIST_SPEC"
  verify_bundle_wheels "$dir/wheels" "$arch" "$pyver"
  bundle_debs "$dir/debs" "$(deb_arch "$arch")"
  say "bundle: the source tree"
  tar -C "$HERE" --exclude="./${dir#"$HERE"/}" --exclude=.venv --exclude=.git --exclude=run --exclude='__pycache__' --exclude='*.egg-info' \
    -czf "$dir/edgeprune-src.tar.gz" .
  {
    echo "arch=$arch"
    echo "python=$pyver"
    echo "torch=$torch"
    echo "made=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit=$(git -C "$HERE" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  } >"$dir/MANIFEST"
  say "bundle ready: $dir ($(du -sh "$dir" | cut -f1)); copy it to each Pi with the source and run" \
      "./install.sh --from-bundle DIR --role ROLE --systemd"
}

# verify_bundle_wheels DIR ARCH PYVER: every wheel installs on ARCH with CPython PYVER, and no CUDA crept in.
verify_bundle_wheels() {
  python3 - "$@" <<'PY'
import pathlib, re, sys
wheels, arch, pyver = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3].replace(".", "")
bad = []
for wheel in sorted(wheels.glob("*.whl")):
    if re.match(r"(nvidia|cuda|triton)[-_]", wheel.name) or "+cu" in wheel.name:
        bad.append(f"{wheel.name}: a CUDA package")
        continue
    python, abi, platforms = wheel.name[:-4].split("-")[-3:]
    plats = platforms.split(".")
    if not all(p == "any" or (p.endswith("_" + arch) and p.startswith(("manylinux", "linux"))) for p in plats):
        bad.append(f"{wheel.name}: platform {platforms}, not {arch}")
    elif not any(t in ("py3", "py2.py3", f"cp{pyver}") or (abi == "abi3" and t.startswith("cp3"))
                 for t in python.split(".")):
        bad.append(f"{wheel.name}: python {python}, not CPython {pyver}")
if bad:
    sys.exit("install.sh: the bundle has wheels that will not install on the target:\n  " + "\n  ".join(bad))
print(f"bundle: all {len(list(wheels.glob('*.whl')))} wheels fit {arch}, CPython {sys.argv[3]}")
PY
}

# bundle_debs DIR DEBARCH: the packages and every package they depend on, for DEBARCH.
bundle_debs() {
  local dir="$1" debarch="$2" native
  native="$(dpkg --print-architecture 2>/dev/null || echo none)"
  if ! command -v apt-get >/dev/null; then
    echo "install.sh: no apt-get here: the bundle has no Debian packages (install them on the Pi by hand)" >&2
    return 0
  fi
  if [ "$debarch" != "$native" ] && ! dpkg --print-foreign-architectures | grep -qx "$debarch"; then
    echo "install.sh: Debian packages for $debarch need 'dpkg --add-architecture $debarch && apt-get update'" \
         "on this machine first; the bundle has wheels only" >&2
    return 0
  fi
  local suffix="" p deps=()
  [ "$debarch" != "$native" ] && suffix=":$debarch"
  # shellcheck disable=SC2086
  for p in ${EDGEPRUNE_BUNDLE_DEBS:-$BUNDLE_DEBS_DEFAULT}; do
    mapfile -t -O "${#deps[@]}" deps < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
      --no-breaks --no-replaces --no-enhances "$p$suffix" | grep -E '^[a-z0-9]' | sed "s/:$debarch\$//")
  done
  mapfile -t deps < <(printf '%s\n' "${deps[@]}" | sort -u)
  say "bundle: ${#deps[@]} Debian packages for $debarch"
  # virtual packages have no file of their own: apt-get download names them and goes on
  (cd "$dir" && for p in "${deps[@]}"; do echo "$p$suffix"; done | xargs apt-get download -q 2>&1 \
    | grep -v -e '^Get:' -e 'unsandboxed' -e "Can't select candidate version" -e 'has no installation candidate' \
    || true)
}

# debs_to_install DIR: the bundled .deb files whose package is missing or older on this machine.
debs_to_install() {
  local deb pkg version have
  for deb in "$1"/*.deb; do
    [ -e "$deb" ] || continue
    pkg="$(dpkg-deb -f "$deb" Package)"
    version="$(dpkg-deb -f "$deb" Version)"
    have="$(dpkg-query -W -f='${Status} ${Version}' "$pkg" 2>/dev/null || true)"
    case "$have" in
      "install ok installed "*) dpkg --compare-versions "${have##* }" ge "$version" && continue ;;
    esac
    echo "$deb"
  done
}

# install_bundle_debs DIR: dpkg -i what is missing, in one go (dpkg orders the dependencies itself).
install_bundle_debs() {
  local debs=()
  mapfile -t debs < <(debs_to_install "$1/debs")
  if [ ${#debs[@]} -eq 0 ]; then
    say "Debian packages: everything in the bundle is installed already"
    return 0
  fi
  say "dpkg -i ${#debs[@]} packages from the bundle"
  DEBIAN_FRONTEND=noninteractive $SUDO dpkg -i "${debs[@]}"
}

# use_bundle_for_pip DIR: every pip call of this install.sh run reads the bundle and nothing else.
use_bundle_for_pip() {
  local manifest_arch
  manifest_arch="$(sed -n 's/^arch=//p' "$1/MANIFEST" 2>/dev/null)"
  if [ -n "$manifest_arch" ] && [ "$manifest_arch" != "$(uname -m)" ]; then
    echo "install.sh: the bundle $1 is for $manifest_arch, this machine is $(uname -m)" >&2
    exit 2
  fi
  # torch==2.13.0 (install.sh's spec) matches the bundled 2.13.0+cpu: a local version label satisfies ==
  export PIP_NO_INDEX=1 PIP_FIND_LINKS="$(cd "$1" && pwd)/wheels" PIP_CONFIG_FILE=/dev/null
}
