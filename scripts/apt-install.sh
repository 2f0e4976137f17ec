# Sourced by scripts/test and scripts/demo: install the Debian packages named in "$@" that are
# missing. Works as root (a fresh Debian image has no sudo) and as a user with sudo; otherwise it
# warns and goes on, so a machine that already has them needs neither.
apt_install() {
  local missing=() p sudo=""
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then
      sudo=sudo
    else
      echo "warning: cannot install ${missing[*]} (not root, no sudo); install them and rerun" >&2
      return 0
    fi
  fi
  echo "installing system packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}
