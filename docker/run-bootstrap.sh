#!/bin/sh
# Entrypoint of the compose `bootstrap` service. Arguments are those of `legion-swarm bootstrap`.
#  1. Creates the identity key if it is missing (`legion-swarm identity`, mode 0600) and
#     prints its peer id.
#  2. Writes /dns4/<service>/tcp/<port>/p2p/<peer id> to $LEGION_ADDR_FILE, where the `peer` service
#     reads it. Only this public address is shared; the key never leaves /data.
#  3. Adds an --announce flag for every word of $LEGION_ANNOUNCE, then execs `legion-swarm bootstrap`.
set -eu

addr_file=${LEGION_ADDR_FILE:-/shared/bootstrap.maddr}
service_host=${LEGION_SERVICE_HOST:-bootstrap}

identity=
port=31337
prev=
for arg in "$@"; do
    case $prev in
        --identity) identity=$arg ;;
        --port) port=$arg ;;
    esac
    case $arg in
        --identity=*) identity=${arg#--identity=} ;;
        --port=*) port=${arg#--port=} ;;
    esac
    prev=$arg
done
if [ -z "$identity" ]; then
    echo "run-bootstrap: --identity PATH is required: the published address must survive restarts" >&2
    exit 2
fi
case $port in
    '' | 0 | *[!0-9]*)
        echo "run-bootstrap: --port must be a fixed port (got '$port')" >&2
        exit 2
        ;;
esac

peer_id=$(legion-swarm identity "$identity") || exit 2

local_maddr="/dns4/$service_host/tcp/$port/p2p/$peer_id"
tmp="$addr_file.tmp.$$"
printf '%s\n' "$local_maddr" >"$tmp"
mv -f "$tmp" "$addr_file" # atomic: a reader never sees a half-written line
echo "run-bootstrap: peer id $peer_id; compose peers dial $local_maddr" >&2

if [ -n "${LEGION_ANNOUNCE:-}" ]; then
    set -f # split on whitespace, never glob
    for maddr in $LEGION_ANNOUNCE; do
        set -- "$@" --announce "$maddr"
    done
    # --announce replaces the advertised addresses, so keep the container's own IPv4 address(es)
    # in the list: the compose peers must still be able to dial this node directly.
    for ip in $(hostname -i 2>/dev/null || true); do
        case $ip in
            127.*) ;;
            *.*.*.*) set -- "$@" --announce "/ip4/$ip/tcp/$port" ;;
        esac
    done
    set +f
fi

exec legion-swarm bootstrap "$@"
