#!/usr/bin/env bash
# Run gradserve's image and compose stack for real, with podman, on a machine that has no Docker
# engine and reaches no image registry (the project's machines: Debian bookworm, root).
#
#   deploy/container-test.sh prepare   packages, configuration, local images (idempotent)
#   deploy/container-test.sh build     build the Dockerfile as gradserve:local (after prepare),
#                                      then remove earlier builds' untagged images
#   deploy/container-test.sh env       print the CONTAINERS_CONF line to export by hand
#   deploy/container-test.sh clean     remove the images this script made
#
# `prepare` does, from nothing, and skips every step already done:
#   1. installs podman 4.3 and what it needs from Debian (apt-get);
#   2. writes a containers.conf (deploy/containers/containers.conf with this machine's limits)
#      into $GRADSERVE_CONTAINERS_STATE (/var/lib/gradserve-containers), used through
#      CONTAINERS_CONF;
#   3. makes the base image the Dockerfile's FROM names (python:3.11-slim-bookworm), which no
#      registry serves here: a minimal Debian bookworm made by debootstrap with Debian's Python
#      3.11, venv and pip and the host's extra CA certificates (pip in the build reaches the
#      package index through them), imported into podman under that name;
#   4. builds the stand-ins for the compose file's nginx and Prometheus images from Debian's
#      packages (deploy/containers/*/Containerfile), tagged with the names compose uses;
#   5. installs podman-compose (PyPI) for $GRADSERVE_PYTHON (.venv/bin/python).
# It prints `CONTAINERS_CONF=...` on stdout, everything else on stderr. It exits 77, saying why,
# where containers cannot run here (not root, no apt-get to install podman, podman unusable):
# tests/container then skip, visibly. Any other failure exits 1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE=$ROOT/deploy/containers
STATE=${GRADSERVE_CONTAINERS_STATE:-/var/lib/gradserve-containers}
PYTHON=${GRADSERVE_PYTHON:-$ROOT/.venv/bin/python}
MIRROR=${GRADSERVE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PODMAN_COMPOSE=podman-compose==1.6.0
PACKAGES=(podman runc netavark aardvark-dns iptables catatonit debootstrap)
# Images this script makes carry this label, whose value says how they were made: the base's
# recipe version (bump BASE_VERSION after changing make_base), and for a stand-in also a hash of
# its folder. An image whose label differs is made again.
LABEL=org.gradserve.container-test
BASE_VERSION=1
SKIP=77

log() { echo "container-test: $*" >&2; }
skip() { log "SKIP: $*"; exit "$SKIP"; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

conf=$STATE/containers.conf

# --- 1. packages ---------------------------------------------------------------------------

install_packages() {
    [[ $(id -u) -eq 0 ]] || skip "needs root (rootful podman, apt-get, debootstrap); run as root"
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    command -v apt-get >/dev/null \
        || skip "no apt-get to install podman and its tools (Debian: ${missing[*]})"
    local start
    start=$(now)
    log "installing ${missing[*]}"
    apt-get update -qq || skip "apt-get update failed: cannot install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null || skip "apt-get install ${missing[*]} failed"
    log "packages installed in $(since "$start")"
}

# --- 2. containers.conf ----------------------------------------------------------------------

hard_limit() {  # a hard limit, or the fallback when unlimited
    local value
    value=$(ulimit -H "$1")
    [[ $value == unlimited ]] && value=$2
    echo "$value"
}

limits() {
    # Containers may not have more than podman itself: root lacks CAP_SYS_RESOURCE here, and
    # podman 4.3 lowers its own process limit to 32768.
    nofile=$(hard_limit -n 1048576)
    nproc=$(hard_limit -u 32768)
    if (( nproc > 32768 )); then nproc=32768; fi
}

write_conf() {
    limits
    mkdir -p "$STATE"
    sed -e "s/@NOFILE@/$nofile/g" -e "s/@NPROC@/$nproc/g" "$HERE/containers.conf" >"$conf.new"
    mv "$conf.new" "$conf"
    export CONTAINERS_CONF=$conf
    podman info >/dev/null 2>"$STATE/podman-info.err" \
        || skip "podman cannot run here: $(tail -1 "$STATE/podman-info.err")"
}

# `podman build` ignores containers.conf's default_ulimits and asks for more than root may have.
build_args() {
    printf '%s\n' --format docker --pull=never \
        --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc"
}

has_image() {  # NAME STAMP: made by this script, as it makes it now
    [[ $(podman image inspect --format "{{index .Labels \"$LABEL\"}}" "$1" 2>/dev/null) \
        == "$2" ]]
}

# --- 3. the base image -------------------------------------------------------------------------

base_name() {
    local names
    names=$(awk 'toupper($1) == "FROM" { print $2 }' "$ROOT/Dockerfile" | sort -u)
    [[ $(wc -l <<<"$names") -eq 1 ]] || die "the Dockerfile's stages use several bases: $names"
    case $names in
        python:3.11-*bookworm) echo "$names" ;;
        *) die "the Dockerfile is FROM $names; this script makes python:3.11-*bookworm only" \
               "(Debian bookworm's Python is 3.11): change make_base to match" ;;
    esac
}

remove_rootfs() {  # DIRECTORY: unmount what debootstrap may have left mounted, then delete
    local mount
    awk -v dir="$1/" 'index($2, dir) == 1 { print $2 }' /proc/mounts | sort -r \
        | while read -r mount; do umount -l "$mount"; done
    rm -rf --one-file-system "$1"
}

make_base() {
    local name=$1 start rootfs
    has_image "$name" "base-$BASE_VERSION" && return
    start=$(now)
    rootfs=$(mktemp -d "$STATE/rootfs.XXXXXX")
    # shellcheck disable=SC2064
    trap "remove_rootfs '$rootfs'" EXIT
    log "making $name: debootstrap bookworm (minbase, Python 3.11) from $MIRROR"
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
        bookworm "$rootfs" "$MIRROR" >"$STATE/debootstrap.log" 2>&1 \
        || die "debootstrap failed: see $STATE/debootstrap.log"
    # The host's extra CA certificates (pip inside a build reaches the package index through
    # them); then the slim image's trimming: no package lists or caches, docs, man pages,
    # locales; and no EXTERNALLY-MANAGED marker, as in the official image.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/usr/share/locale/* "$rootfs"/var/log/* \
        "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    tar -C "$rootfs" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -c . \
        | podman import --quiet --change "LABEL $LABEL=base-$BASE_VERSION" \
            --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "localhost/$name" >/dev/null
    remove_rootfs "$rootfs"
    trap - EXIT
    log "made $name in $(since "$start")"
}

# --- 4. stand-ins for the compose file's other images --------------------------------------

compose_image() {  # the image of a compose service, by the image's repository name
    awk -v repo="$1:" '$1 == "image:" { v = $2; gsub(/["\047]/, "", v)
                                          if (index(v, repo) == 1) { print v; exit } }' \
        "$ROOT/docker-compose.yml"
}

make_stand_in() {  # DIRECTORY REPOSITORY
    local name start stamp
    name=$(compose_image "$2")
    [[ -n $name ]] || die "docker-compose.yml names no $2 image"
    stamp=$(cat "$HERE/$1"/* | sha256sum | cut -c1-16)
    stamp="base-$BASE_VERSION-$1-$stamp"
    has_image "$name" "$stamp" && return
    start=$(now)
    mapfile -t args < <(build_args)
    podman build "${args[@]}" --label "$LABEL=$stamp" -t "localhost/$name" "$HERE/$1" \
        >"$STATE/build-$1.log" 2>&1 \
        || die "building the $1 stand-in failed: see $STATE/build-$1.log"
    log "made the stand-in $name from Debian's $1 in $(since "$start")"
}

# --- 5. podman-compose -------------------------------------------------------------------------

install_podman_compose() {
    [[ -x $PYTHON ]] || die "no Python at $PYTHON (set GRADSERVE_PYTHON, or run .ci/test first)"
    "$PYTHON" -c "import podman_compose" 2>/dev/null && return
    log "installing $PODMAN_COMPOSE for $PYTHON"
    "$PYTHON" -m pip install --quiet "$PODMAN_COMPOSE" \
        || die "pip install $PODMAN_COMPOSE failed"
}

# --- commands ----------------------------------------------------------------------------------

prepare() {
    local start
    start=$(now)
    install_packages
    write_conf
    make_base "$(base_name)"
    make_stand_in nginx nginx
    make_stand_in prometheus prom/prometheus
    install_podman_compose
    log "prepared in $(since "$start")"
    echo "CONTAINERS_CONF=$conf"
}

case ${1:-} in
    prepare) prepare ;;
    build)
        shift
        [[ -f $conf ]] || die "run '$0 prepare' first"
        export CONTAINERS_CONF=$conf
        limits
        mapfile -t args < <(build_args)
        podman build "${args[@]}" -t localhost/gradserve:local "$@" -f "$ROOT/Dockerfile" "$ROOT"
        # Earlier builds' untagged images (made on our base, so labelled) go: the disk stays
        # bounded when the source changes between runs; the build cache goes with them.
        podman image prune --force --filter "label=$LABEL" >/dev/null
        ;;
    env) echo "export CONTAINERS_CONF=$conf" ;;
    clean)
        export CONTAINERS_CONF=$conf
        mapfile -t ours < <(podman images --filter "label=$LABEL" --format '{{.Id}}' | sort -u)
        podman rmi -f localhost/gradserve:local "${ours[@]}" 2>/dev/null || true
        podman image prune -f >/dev/null
        ;;
    *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
