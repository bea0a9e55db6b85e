#!/usr/bin/env bash
# The main job on the built-in defaults: netd (privileged) in a network
# namespace of its own, vmm as uid 65534 with a virtio-net device on a TAP
# that netd created, the guest's serial console, ping from the namespace,
# pause/resume with vmctl, a live migration to a fresh vmm under a running
# ping (same TAP, netd not asked), shutdown. Everything it creates is removed
# on exit; the host's own network is not touched.
#
# Usage: sudo ./demo.sh        (needs /dev/kvm, iproute2 and ping)
set -euo pipefail
cd "$(dirname "$0")"

[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (netd needs CAP_NET_ADMIN; vmm drops to uid 65534)" >&2; exit 2; }
for tool in ip ping; do
    command -v "$tool" >/dev/null || { echo "demo.sh: '$tool' is missing (apt-get install iproute2 iputils-ping)" >&2; exit 2; }
done

cargo build --release --workspace --quiet
bin=target/release

ns="vmmdemo-$$"
work=$(mktemp -d /tmp/vmmdemo.XXXXXX)
# vmm (uid 65534) creates its API socket and serial log here.
chown 65534:65534 "$work"
netd_pid=""
vmm_pid=""
target_pid=""
ping_pid=""
cleanup() {
    [ -n "$ping_pid" ] && kill "$ping_pid" 2>/dev/null || true
    [ -n "$target_pid" ] && kill "$target_pid" 2>/dev/null || true
    [ -n "$vmm_pid" ] && kill "$vmm_pid" 2>/dev/null || true
    [ -n "$netd_pid" ] && kill -TERM "$netd_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "netd in network namespace $ns (policy/netd.ron)"
ip netns add "$ns"
ip -n "$ns" link set lo up
ip netns exec "$ns" "$bin/netd" --socket "$work/netd.sock" --policy policy/netd.ron \
    --audit-log "$work/audit.log" &
netd_pid=$!
for _ in $(seq 100); do [ -S "$work/netd.sock" ] && break; sleep 0.05; done
[ -S "$work/netd.sock" ] || { echo "netd did not start" >&2; exit 1; }

step "vmm as uid 65534: test guest with a virtio-net device on TAP vm0"
"$bin/vmm" --user 65534:65534 --kernel target/guest/testguest.elf --memory 128M \
    --cmdline "testguest.ip=10.0.1.2/24 testguest.heartbeat=1000" \
    --net "netd=$work/netd.sock,id=vm0" --api-socket "$work/vmm.sock" \
    --serial "$work/serial.log" &
vmm_pid=$!
for _ in $(seq 200); do grep -q "testguest: up" "$work/serial.log" 2>/dev/null && break; sleep 0.05; done
sed 's/^/  serial| /' "$work/serial.log"
echo "  vmm runs as: $(ps -o user=,pid=,comm= -p "$vmm_pid")"
grep -E '^(CapEff|NoNewPrivs|Seccomp):' "/proc/$vmm_pid/status" | sed 's/^/  /'
echo "  netd audit: $(tail -n 1 "$work/audit.log")"

step "ping the guest from the namespace (TAP vm0 on bridge vmbr0, 10.0.1.1/24)"
ip netns exec "$ns" ping -c 4 -i 0.2 10.0.1.2

step "vmctl status / pause / resume"
"$bin/vmctl" --api-socket "$work/vmm.sock" status
"$bin/vmctl" --api-socket "$work/vmm.sock" pause
echo "  paused: a ping now gets no answer"
ip netns exec "$ns" ping -c 1 -W 1 10.0.1.2 >/dev/null 2>&1 && echo "  (unexpected answer)" || echo "  no answer, as expected"
"$bin/vmctl" --api-socket "$work/vmm.sock" resume
ip netns exec "$ns" ping -c 2 -i 0.2 10.0.1.2

step "live migration under a running ping: a fresh vmm takes the guest, its RAM and the very same TAP"
audit_before=$(wc -l < "$work/audit.log")
ifindex_before=$(ip -n "$ns" -o link show vm0 | cut -d: -f1)
# The target: same tenant and flags, no kernel, no --api-socket (it takes
# over the source's, so vmm.sock keeps answering).
"$bin/vmm" --user 65534:65534 --memory 128M --net "netd=$work/netd.sock,id=vm0" \
    --incoming "$work/mig.sock" --serial "$work/serial2.log" &
target_pid=$!
for _ in $(seq 200); do [ -S "$work/mig.sock" ] && break; sleep 0.05; done
[ -S "$work/mig.sock" ] || { echo "the target vmm did not start" >&2; exit 1; }
echo "  target vmm pid $target_pid waits on $work/mig.sock; netd audit log: $audit_before lines"
ip netns exec "$ns" ping -n -q -c 300 -i 0.01 10.0.1.2 > "$work/ping.log" &
ping_pid=$!
sleep 1
echo "  \$ vmctl migrate --to $work/mig.sock --json    (ping -i 0.01 running)"
report=$("$bin/vmctl" --api-socket "$work/vmm.sock" migrate --to "$work/mig.sock" --json)
echo "  $report"
downtime_us=$(echo "$report" | grep -o '"downtime_us":[0-9]*' | cut -d: -f2)
echo "  downtime (source vCPU pause to target vCPU resume): ${downtime_us} us"
if wait "$vmm_pid"; then
    echo "  old vmm (pid $vmm_pid) exited 0"
else
    echo "  old vmm (pid $vmm_pid) exited with status $?"
fi
vmm_pid=$target_pid
target_pid=""
wait "$ping_pid" || true
ping_pid=""
echo "  ping during the migration: $(grep 'packets transmitted' "$work/ping.log")"
echo "  netd audit log: $(wc -l < "$work/audit.log") lines (was $audit_before): netd was not asked"
echo "  TAP vm0 ifindex: $(ip -n "$ns" -o link show vm0 | cut -d: -f1) (was $ifindex_before)"
echo "  vmctl status now answers from pid $("$bin/vmctl" --api-socket "$work/vmm.sock" status --json | grep -o '"pid":[0-9]*' | cut -d: -f2) (the new vmm is $vmm_pid)"
echo "  guest heartbeat: last on the old vmm '$(grep "testguest: tick" "$work/serial.log" | tail -n 1)'," \
    "first on the new '$(grep -m1 "testguest: tick" "$work/serial2.log")'"

step "shutdown"
"$bin/vmctl" --api-socket "$work/vmm.sock" shutdown
wait "$vmm_pid" && echo "  vmm exited 0"
vmm_pid=""
sleep 0.2
ip -n "$ns" link show vm0 >/dev/null 2>&1 && echo "  TAP vm0 still exists?" || echo "  TAP vm0 is gone with the vmm (netd kept no fd)"
tail -n 2 "$work/serial2.log" | sed 's/^/  serial| /'
