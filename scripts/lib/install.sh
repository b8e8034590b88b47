# Sourced by the check scripts (db-checks.sh, deb-check.sh, proxy-interop.sh); ports.sh beside it.
#
# install_missing "SERVICES" PACKAGE...: installs the packages with apt-get (quietly; nothing
# if none is named), then stops and disables the system services SERVICES that installing them
# started: the scripts run their own instances on their own ports.
install_missing() {
    local services=$1 service
    shift
    (($#)) || return 0
    echo "installing $*"
    export DEBIAN_FRONTEND=noninteractive
    # Wait for a dpkg lock another apt (unattended-upgrades on a fresh machine) holds, and try
    # the index download twice.
    apt-get update -qq || apt-get update -qq
    apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends "$@" >/dev/null
    for service in $services; do
        systemctl disable --now "$service" >/dev/null 2>&1 || service "$service" stop >/dev/null 2>&1 || true
    done
}
