#!/usr/bin/env bash
# Install (or update, or remove) a fedge edge agent as a systemd service on a Raspberry Pi
# OS 64-bit or any Debian system. Run with --help for the options.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly MIN_PYTHON_MAJOR=3
readonly MIN_PYTHON_MINOR=11
readonly SERVICE_USER=fedge
readonly UNIT_NAME=fedge-agent.service
readonly UNIT_DIR=/etc/systemd/system
readonly DATA_DIR=/var/lib/fedge
readonly DEFAULT_PREFIX=/opt/fedge
readonly DEFAULT_CONFIG_DIR=/etc/fedge

ROOT="${FEDGE_INSTALL_ROOT:-/}"
PIP_NO_DEPS="${FEDGE_PIP_NO_DEPS:-0}"

BROKER_URL=""
AGENT_ID=""
FLEET=""
COORDINATOR_KEY=""
USERNAME=""
PASSWORD=""
PASSWORD_FILE=""
CA_FILE=""
SOURCE_DIR="$(cd "${SCRIPT_DIR}/../.." && pwd)"
PREFIX="${DEFAULT_PREFIX}"
CONFIG_DIR="${DEFAULT_CONFIG_DIR}"
PYTHON="python3"
ACTION=install
PURGE=0
DRY_RUN=0

usage() {
    cat <<'EOF'
Usage: install.sh [options]
       install.sh --uninstall [--purge] [options]

Install a fedge edge agent as the systemd service fedge-agent on Raspberry Pi OS 64-bit
or any Debian: a system user "fedge" (no login shell), a virtualenv under the prefix with
fedge[agent] (OpenCV and LiteRT, no TensorFlow), the config file agent.toml (mode 640,
root:fedge) and the unit fedge-agent.service, enabled and started. Running it again
updates everything in place: agent.toml is rewritten from the options given, or kept as
it is when none of the settings options is given (so `install.sh --source DIR` alone
updates the code only).

Options:
  --broker URL            broker URL, e.g. mqtt://hub.local:1883 or mqtts://hub:8883
  --agent-id ID           this agent's id (default: the host name, chosen by fedge)
  --fleet NAME            fleet name (default: fedge's default fleet)
  --coordinator-key PATH  coordinator's public key; copied to CONFIG_DIR/coordinator.pub
                          (without it the agent takes no part in federated rounds)
  --username NAME         broker user name
  --password SECRET       broker password (never printed; visible to `ps` while the
                          script runs: prefer --password-file)
  --password-file PATH    read the broker password from the first line of PATH
  --ca-file PATH          CA certificate for mqtts://; copied to CONFIG_DIR/ca.crt
  --source DIR            fedge checkout to install from (default: the repository this
                          script lives in)
  --prefix DIR            install prefix; the virtualenv is PREFIX/venv (default /opt/fedge)
  --config-dir DIR        config directory (default /etc/fedge)
  --python PATH           Python 3.11+ interpreter for the virtualenv (default python3)
  --uninstall             stop, disable and remove the service and the virtualenv
  --purge                 with --uninstall: also remove the config directory and the
                          agent's data in /var/lib/fedge
  --dry-run               print every command instead of running it
  -h, --help              show this help

Environment:
  FEDGE_INSTALL_ROOT      filesystem root to install into (default /). When it is not /,
                          useradd, chown and systemctl are not run (the script prints what
                          it would do), so a test can install into a temporary directory.
  FEDGE_PIP_NO_DEPS=1     install the fedge package alone (pip --no-deps): quick, for
                          tests; the agent does not run without its dependencies.

Examples:
  sudo deploy/pi/install.sh --broker mqtt://hub.local:1883 --agent-id door-cam \
      --coordinator-key fedge.pub
  sudo deploy/pi/install.sh --uninstall --purge
EOF
}

log() { printf 'fedge-install: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# Runs a command, or prints it with --dry-run.
run() {
    if [[ "${DRY_RUN}" == 1 ]]; then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

# Commands that change the real system's users, ownership or services: only on root /.
run_system() {
    if [[ "${ROOT}" != / ]]; then
        printf 'skipped (FEDGE_INSTALL_ROOT=%s):' "${ROOT}"
        printf ' %q' "$@"
        printf '\n'
    else
        run "$@"
    fi
}

# The path as seen from the current filesystem: PATH under FEDGE_INSTALL_ROOT.
at() { printf '%s%s' "${ROOT%/}" "$1"; }

# A TOML basic string: backslash and quote escaped; control characters refused.
toml_string() {
    local value="$1"
    if [[ "${value}" =~ [[:cntrl:]] ]]; then
        die "control characters are not allowed in config values"
    fi
    value="${value//\\/\\\\}"
    value="${value//\"/\\\"}"
    printf '"%s"' "${value}"
}

need_value() {
    [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"
}

parse_args() {
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --broker) need_value "$@"; BROKER_URL="$2"; shift 2 ;;
            --agent-id) need_value "$@"; AGENT_ID="$2"; shift 2 ;;
            --fleet) need_value "$@"; FLEET="$2"; shift 2 ;;
            --coordinator-key) need_value "$@"; COORDINATOR_KEY="$2"; shift 2 ;;
            --username) need_value "$@"; USERNAME="$2"; shift 2 ;;
            --password) need_value "$@"; PASSWORD="$2"; shift 2 ;;
            --password-file) need_value "$@"; PASSWORD_FILE="$2"; shift 2 ;;
            --ca-file) need_value "$@"; CA_FILE="$2"; shift 2 ;;
            --source) need_value "$@"; SOURCE_DIR="$2"; shift 2 ;;
            --prefix) need_value "$@"; PREFIX="$2"; shift 2 ;;
            --config-dir) need_value "$@"; CONFIG_DIR="$2"; shift 2 ;;
            --python) need_value "$@"; PYTHON="$2"; shift 2 ;;
            --uninstall) ACTION=uninstall; shift ;;
            --purge) PURGE=1; shift ;;
            --dry-run) DRY_RUN=1; shift ;;
            -h | --help) usage; exit 0 ;;
            *) usage >&2; die "unknown option: $1" ;;
        esac
    done
    [[ "${PREFIX}" == /* ]] || die "--prefix must be an absolute path"
    [[ "${CONFIG_DIR}" == /* ]] || die "--config-dir must be an absolute path"
    if [[ "${PURGE}" == 1 && "${ACTION}" != uninstall ]]; then
        die "--purge only goes with --uninstall"
    fi
    if [[ -n "${PASSWORD_FILE}" ]]; then
        [[ -z "${PASSWORD}" ]] || die "give --password or --password-file, not both"
        [[ -r "${PASSWORD_FILE}" ]] || die "cannot read ${PASSWORD_FILE}"
        IFS= read -r PASSWORD <"${PASSWORD_FILE}" || true
    fi
}

check_root_user() {
    if [[ "${ROOT}" == / && "${DRY_RUN}" == 0 && "${EUID}" -ne 0 ]]; then
        die "run as root (sudo), or use --dry-run to see what would be done"
    fi
}

check_python() {
    command -v "${PYTHON}" >/dev/null || die "${PYTHON} not found: apt-get install -y python3"
    if ! "${PYTHON}" -c "import sys; sys.exit(sys.version_info < (${MIN_PYTHON_MAJOR}, ${MIN_PYTHON_MINOR}))"; then
        die "fedge needs Python ${MIN_PYTHON_MAJOR}.${MIN_PYTHON_MINOR}+; ${PYTHON} is $("${PYTHON}" -V 2>&1)"
    fi
    if ! "${PYTHON}" -c "import ensurepip, venv" 2>/dev/null; then
        # Debian ships venv support separately from the interpreter.
        if [[ "${ROOT}" == / ]]; then
            run apt-get install -y python3-venv
        else
            die "${PYTHON} has no venv support: apt-get install -y python3-venv"
        fi
    fi
}

create_user() {
    if id -u "${SERVICE_USER}" >/dev/null 2>&1; then
        log "user ${SERVICE_USER} exists"
        return
    fi
    run_system useradd --system --user-group --no-create-home \
        --home-dir "${DATA_DIR}" --shell /usr/sbin/nologin "${SERVICE_USER}"
}

install_venv() {
    local venv
    venv="$(at "${PREFIX}")/venv"
    [[ -f "${SOURCE_DIR}/pyproject.toml" ]] || die "${SOURCE_DIR} is not a fedge checkout"
    run mkdir -p "$(at "${PREFIX}")"
    if [[ ! -x "${venv}/bin/python" ]]; then
        run "${PYTHON}" -m venv "${venv}"
    else
        log "virtualenv ${venv} exists: updating it"
    fi
    local pip_args=(install --upgrade --quiet)
    if [[ "${PIP_NO_DEPS}" == 1 ]]; then
        pip_args+=(--no-deps)
    fi
    # pip always rebuilds a local directory, so a newer checkout with the same version
    # number still replaces the installed files.
    run "${venv}/bin/pip" "${pip_args[@]}" "${SOURCE_DIR}[agent]"
}

write_config() {
    local config_dir config tmp
    config_dir="$(at "${CONFIG_DIR}")"
    config="${config_dir}/agent.toml"
    run mkdir -p "${config_dir}"
    run chmod 750 "${config_dir}"
    run_system chown "root:${SERVICE_USER}" "${config_dir}"
    if [[ -n "${COORDINATOR_KEY}" ]]; then
        [[ -r "${COORDINATOR_KEY}" ]] || die "cannot read ${COORDINATOR_KEY}"
        run install -m 644 "${COORDINATOR_KEY}" "${config_dir}/coordinator.pub"
    fi
    if [[ -n "${CA_FILE}" ]]; then
        [[ -r "${CA_FILE}" ]] || die "cannot read ${CA_FILE}"
        run install -m 644 "${CA_FILE}" "${config_dir}/ca.crt"
    fi
    if [[ -f "${config}" && -z "${BROKER_URL}${AGENT_ID}${FLEET}${USERNAME}${PASSWORD}${CA_FILE}${COORDINATOR_KEY}" ]]; then
        log "no settings given: keeping ${config}"
        return
    fi
    if [[ "${DRY_RUN}" == 1 ]]; then
        # The content holds the password: say what is written, never the secret.
        printf '+ write %q (mode 640, root:%s)\n' "${config}" "${SERVICE_USER}"
        return
    fi
    tmp="$(mktemp "${config_dir}/.agent.toml.XXXXXX")"
    chmod 640 "${tmp}"
    {
        printf '# Written by deploy/pi/install.sh; FEDGE_* environment variables override it.\n'
        printf 'data_dir = %s\n' "$(toml_string "${DATA_DIR}")"
        if [[ -n "${BROKER_URL}" ]]; then printf 'broker_url = %s\n' "$(toml_string "${BROKER_URL}")"; fi
        if [[ -n "${AGENT_ID}" ]]; then printf 'agent_id = %s\n' "$(toml_string "${AGENT_ID}")"; fi
        if [[ -n "${FLEET}" ]]; then printf 'fleet = %s\n' "$(toml_string "${FLEET}")"; fi
        if [[ -n "${USERNAME}" ]]; then printf 'username = %s\n' "$(toml_string "${USERNAME}")"; fi
        if [[ -n "${PASSWORD}" ]]; then printf 'password = %s\n' "$(toml_string "${PASSWORD}")"; fi
        if [[ -n "${CA_FILE}" ]]; then
            printf 'ca_file = %s\n' "$(toml_string "${CONFIG_DIR}/ca.crt")"
        fi
        if [[ -n "${COORDINATOR_KEY}" ]]; then
            printf 'coordinator_key = %s\n' "$(toml_string "${CONFIG_DIR}/coordinator.pub")"
        fi
    } >"${tmp}"
    run_system chown "root:${SERVICE_USER}" "${tmp}"
    mv -f "${tmp}" "${config}"
    log "wrote ${config}"
}

install_unit() {
    local source_unit="${SCRIPT_DIR}/../systemd/${UNIT_NAME}"
    local unit_dir unit
    unit_dir="$(at "${UNIT_DIR}")"
    unit="${unit_dir}/${UNIT_NAME}"
    [[ -f "${source_unit}" ]] || die "${source_unit} is missing"
    run mkdir -p "${unit_dir}"
    if [[ "${DRY_RUN}" == 1 ]]; then
        printf '+ write %q from %q (prefix %s, config dir %s)\n' \
            "${unit}" "${source_unit}" "${PREFIX}" "${CONFIG_DIR}"
    else
        # The unit names the default paths; a custom prefix or config dir is substituted.
        sed -e "s|${DEFAULT_PREFIX}/|${PREFIX}/|g" -e "s|${DEFAULT_CONFIG_DIR}/|${CONFIG_DIR}/|g" \
            "${source_unit}" >"${unit}"
        chmod 644 "${unit}"
        log "wrote ${unit}"
    fi
    run_system systemctl daemon-reload
    run_system systemctl enable --now "${UNIT_NAME}"
    # enable --now leaves an already running service alone: restart it on the new code.
    run_system systemctl restart "${UNIT_NAME}"
}

do_install() {
    check_root_user
    check_python
    create_user
    install_venv
    write_config
    install_unit
    if [[ "${DRY_RUN}" == 1 ]]; then
        log "dry run: nothing was changed"
    else
        log "installed; follow the agent with: journalctl -u ${UNIT_NAME} -f"
    fi
}

do_uninstall() {
    check_root_user
    local unit
    unit="$(at "${UNIT_DIR}")/${UNIT_NAME}"
    if [[ "${ROOT}" != / ]] || systemctl list-unit-files "${UNIT_NAME}" >/dev/null 2>&1; then
        run_system systemctl disable --now "${UNIT_NAME}"
    fi
    run rm -f "${unit}"
    run_system systemctl daemon-reload
    run rm -rf "$(at "${PREFIX}")/venv"
    if [[ "${PURGE}" == 1 ]]; then
        run rm -rf "$(at "${CONFIG_DIR}")" "$(at "${DATA_DIR}")"
        if id -u "${SERVICE_USER}" >/dev/null 2>&1; then
            run_system userdel "${SERVICE_USER}"
        fi
    fi
    if [[ "${DRY_RUN}" == 1 ]]; then
        log "dry run: nothing was changed"
    else
        log "uninstalled"
    fi
}

main() {
    parse_args "$@"
    if [[ "${ACTION}" == uninstall ]]; then
        do_uninstall
    else
        do_install
    fi
}

main "$@"
