#!/usr/bin/env bash
# Installs what tests/slurm/cluster.py needs for a real single-node SLURM cluster:
# munge, MariaDB and SLURM 22.05 (Debian bookworm packages). Idempotent: exits at once when
# every binary is present. The tests start their own daemons with all state in a temporary
# folder, so the packages' own services must not be left running; any that the install
# started are stopped again. Without root it explains why and exits 0 (the tests then skip
# with that reason).
set -euo pipefail
# Debian puts the daemons in sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

packages=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
binaries=(munged mungekey mariadbd mariadb-install-db mariadb slurmdbd slurmctld slurmd
          sbatch srun scontrol sinfo squeue scancel sacct sacctmgr)
services=(slurmd slurmctld slurmdbd mariadb munge)

missing=()
for binary in "${binaries[@]}"; do
    command -v "$binary" >/dev/null 2>&1 || missing+=("$binary")
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

echo "install_slurm: missing ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
    echo "install_slurm: not root, cannot apt-get install ${packages[*]};" \
         "the SLURM tests will be skipped. Re-run as root: bash .ci/install_slurm.sh"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm: no apt-get (not Debian/Ubuntu); install ${packages[*]} yourself;" \
         "the SLURM tests will be skipped"
    exit 0
fi

# PIDs of the packages' daemons before installing, so that only ones the install started
# are stopped afterwards.
daemon_pids() {
    pgrep -x 'munged|mariadbd|mysqld|slurmdbd|slurmctld|slurmd' 2>/dev/null | sort || true
}
before="$(daemon_pids)"

apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}"

# Stop and disable what the packages may have started (systemd or sysvinit hosts); in a
# container without an init system nothing starts (policy-rc.d / no runlevel).
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    for service in "${services[@]}"; do
        systemctl disable --now "$service" >/dev/null 2>&1 || true
    done
elif command -v service >/dev/null 2>&1; then
    for service in "${services[@]}"; do
        service "$service" stop >/dev/null 2>&1 || true
    done
fi
for pid in $(comm -13 <(printf '%s\n' "$before") <(daemon_pids)); do
    echo "install_slurm: stopping $(ps -o comm= -p "$pid" 2>/dev/null || true) (pid $pid)" \
         "started by the package install"
    kill "$pid" 2>/dev/null || true
done

for binary in "${binaries[@]}"; do
    command -v "$binary" >/dev/null 2>&1 || {
        echo "install_slurm: $binary still missing after installing ${packages[*]}" >&2
        exit 1
    }
done
echo "install_slurm: installed ${packages[*]}"
