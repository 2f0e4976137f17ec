"""``edgekeeper device|cloud install|uninstall``: the manual steps of systemd/README.md as one
idempotent command.

An install is a list of steps (the system user, directories with the units' modes, the
virtualenv, the config copied from examples/ only when absent, the unit files, systemd's
daemon-reload + enable, and for a board the enrollment into the service's state directory).
Each step looks before it acts and reports ``changed``, ``ok`` (already so) or ``skip`` (with
what to run instead), so running it twice changes nothing the second time.

Every path is prefixed with ``--root`` (default /). Anything that touches the running system
itself (useradd, chown, systemctl) happens only when the root is / and we are root; with another
root (tests, image builds) it is skipped with the command to run, so a test never touches the
real system. This module imports neither half of the pipeline (device/cloud import it): the
board's enrollment is handed in as a callable.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from edgekeeper import config as config_mod
from edgekeeper.errors import FatalError

USER = "edgekeeper"
# The path the shipped units' ExecStart uses; rewritten to the venv actually installed.
UNIT_EXE = "/opt/edgekeeper/.venv/bin/edgekeeper"
VENV = "/opt/edgekeeper/.venv"
ETC = "/etc/edgekeeper"
UNIT_DIR = "/etc/systemd/system"
ALL_UNITS = ("edgekeeper-device.service", "edgekeeper-cloud.service",
             "edgekeeper-worker@.service")


class InstallError(FatalError):
    """The install cannot go on (not root, no source tree, purge without --yes...)."""


@dataclasses.dataclass(frozen=True)
class Role:
    """What one half installs: its config, units, state directory and user groups."""

    name: str                    # "device" | "cloud"
    config: str                  # file name in /etc/edgekeeper and examples/
    units: tuple[str, ...]       # unit files shipped in systemd/
    enable: tuple[str, ...]      # what `systemctl enable` gets (a template needs an instance)
    state_dir: str               # the units' StateDirectory=, under /var/lib
    env: tuple[tuple[str, str], ...]  # the units' Environment= that locate the state
    groups: tuple[str, ...] = ()  # supplementary groups of the user (camera, microphone)
    pip_extra: str = ""           # the extra the venv installs


DEVICE = Role("device", "device.toml", ("edgekeeper-device.service",),
              ("edgekeeper-device.service",), "/var/lib/edgekeeper",
              (("EDGEKEEPER_STATE_DIR", "/var/lib/edgekeeper"),), groups=("video", "audio"))
CLOUD = Role("cloud", "cloud.toml", ("edgekeeper-cloud.service", "edgekeeper-worker@.service"),
             ("edgekeeper-cloud.service", "edgekeeper-worker@1.service"),
             "/var/lib/edgekeeper-cloud",
             (("EDGEKEEPER_CLOUD_DATA_DIR", "/var/lib/edgekeeper-cloud"),), pip_extra="[cloud]")

# (cloud_url, token, state_dir, device_id, ca_file) -> None: enrolls, writing the keys and
# enrollment.json into state_dir (device/identity.py, through edgekeeper.device.link_cli).
Enroller = Callable[[str, str, Path, str, str], None]


@dataclasses.dataclass(frozen=True)
class Options:
    root: Path
    dry_run: bool
    source: Path
    venv_from: str | None   # None: create VENV; "CURRENT": this interpreter's environment
    no_venv: bool
    cloud: str | None = None
    token: str | None = None


class Plan:
    """Runs steps and prints one line per step: ``changed``, ``ok``, ``skip`` or ``would``."""

    def __init__(self, opts: Options, out: Callable[[str], None] = print) -> None:
        self.opts = opts
        self.out = out
        self.changed = 0
        # useradd, chown and systemctl act on the real system only for a real install as root.
        self.real = opts.root == Path("/") and os.geteuid() == 0

    def path(self, target: str) -> Path:
        return self.opts.root / target.lstrip("/")

    def report(self, status: str, what: str) -> None:
        self.out(f"{status:<8}{what}")

    def step(self, needed: bool, what: str, act: Callable[[], None]) -> None:
        if not needed:
            self.report("ok", what)
        elif self.opts.dry_run:
            self.report("would", what)
        else:
            act()
            self.changed += 1
            self.report("changed", what)

    # -- the system user
    def user(self, role: Role) -> None:
        cmd = ["useradd", "--system", "--home", role.state_dir, "--shell", "/usr/sbin/nologin"]
        if role.groups:
            cmd += ["--groups", ",".join(role.groups)]
        cmd.append(USER)
        if not self.real:
            self.report("skip", f"system user {USER} (not a real install as root; run: "
                        f"{' '.join(cmd)})")
            return
        self.step(not _user_exists(), f"system user {USER}", lambda: _run(cmd))

    # -- directories and files with their owners and modes
    def directory(self, target: str, mode: int, owner: str = "root") -> None:
        p = self.path(target)
        needed = not p.is_dir() or (p.stat().st_mode & 0o7777) != mode or not self._owned(p, owner)

        def act() -> None:
            p.mkdir(parents=True, exist_ok=True)
            os.chmod(p, mode)
            self._chown(p, owner)

        self.step(needed, f"directory {target} ({mode:04o}, {owner})", act)

    def file(self, target: str, content: bytes, mode: int, owner: str = "root",
             group: str = "root", *, replace: bool = True) -> bool:
        """Write ``content`` unless the file holds it already (or exists, with replace=False);
        return whether it existed before."""
        p = self.path(target)
        existed = p.exists()
        needed = (not existed or (replace and p.read_bytes() != content)
                  or (p.stat().st_mode & 0o7777) != mode or not self._owned(p, owner, group))

        def act() -> None:
            if not existed or (replace and p.read_bytes() != content):
                p.parent.mkdir(parents=True, exist_ok=True)  # /etc/systemd/system in a --root
                _atomic_write(p, content, mode)
            os.chmod(p, mode)
            self._chown(p, owner, group)

        self.step(needed, f"file {target} ({mode:04o}, {owner}:{group})", act)
        return existed

    def _owned(self, p: Path, owner: str, group: str | None = None) -> bool:
        if not self.real:
            return True  # ownership is not ours to set outside a real install
        if not _user_exists():
            return False  # a dry run before useradd
        st = p.stat()
        want = pwd.getpwnam(owner)
        gid = want.pw_gid if group is None else _gid(group)
        return st.st_uid == want.pw_uid and st.st_gid == gid

    def _chown(self, p: Path, owner: str, group: str | None = None) -> None:
        if self.real:
            shutil.chown(p, owner, group or owner)

    # -- systemd
    def systemctl(self, *args: str) -> None:
        cmd = ["systemctl", *args]
        if not (self.real and Path("/run/systemd/system").is_dir()):
            self.report("skip", f"systemd not managed here; run: {' '.join(cmd)}")
        else:
            self.step(True, " ".join(cmd), lambda: _run(cmd))


def _user_exists() -> bool:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return False
    return True


def _gid(group: str) -> int:
    import grp

    return grp.getgrnam(group).gr_gid


def _run(cmd: Sequence[str]) -> None:
    done = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise InstallError(f"`{' '.join(cmd)}` failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[:300]}",
                           fix="fix what it says and run the install again (it is idempotent)")


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Temp file + fsync + rename: a config or unit is never half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def default_source() -> Path:
    """The checkout holding examples/ and systemd/: the one this module runs from (an editable
    install or a clone), else /opt/edgekeeper (where systemd/README.md clones it)."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "systemd").is_dir() else Path("/opt/edgekeeper")


def _venv_exe(plan: Plan, role: Role) -> str:
    """Set up the virtualenv (or not) and return the edgekeeper the units should start."""
    opts = plan.opts
    if opts.venv_from is not None:
        prefix = Path(sys.prefix if opts.venv_from == "CURRENT" else opts.venv_from).absolute()
        exe = prefix / "bin" / "edgekeeper"
        if not exe.is_file():
            raise InstallError(f"{exe} does not exist: --venv-from needs an environment with "
                               "edgekeeper installed",
                               fix="pip install edgekeeper into it, or drop --venv-from")
        plan.report("ok", f"virtualenv {prefix} (reused, --venv-from)")
        return str(exe)
    if opts.no_venv:
        plan.report("skip", f"virtualenv {VENV} (--no-venv; create it: python3 -m venv {VENV} "
                    f"&& {VENV}/bin/pip install '{opts.source}{role.pip_extra}')")
        return UNIT_EXE
    venv = plan.path(VENV)

    def create() -> None:
        _run([sys.executable, "-m", "venv", str(venv)])
        _run([str(venv / "bin" / "pip"), "install", "-q", f"{opts.source}{role.pip_extra}"])

    plan.step(not (venv / "bin" / "edgekeeper").is_file(),
              f"virtualenv {VENV} (pip install {opts.source}{role.pip_extra})", create)
    return UNIT_EXE


def _config(plan: Plan, role: Role) -> Path:
    """Copy the shipped example when no config exists; never overwrite an operator's."""
    example = plan.opts.source / "examples" / role.config
    target = f"{ETC}/{role.config}"
    p = plan.path(target)
    existed = plan.file(target, example.read_bytes(), 0o640, "root", USER, replace=False)
    if existed and p.read_bytes() != example.read_bytes() \
            and example.stat().st_mtime > p.stat().st_mtime:
        plan.report("note", f"the shipped {example.name} is newer than {target}; compare: "
                    f"diff -u {p} {example}")
    return p


def _load_config(plan: Plan, role: Role, path: Path) -> config_mod.Config | None:
    """Parse the installed config as the unit will (its Environment=): a mistake stops the
    install before the units are enabled, with the key and the fix (config.load's error)."""
    if not path.exists():  # a dry run that has not copied it yet
        return None
    return config_mod.load(path, env=dict(role.env))


def _units(plan: Plan, role: Role, exe: str) -> None:
    for name in role.units:
        text = (plan.opts.source / "systemd" / name).read_text()
        if UNIT_EXE not in text:
            raise InstallError(f"systemd/{name} does not start {UNIT_EXE}",
                               fix="use the unit files shipped with this version")
        plan.file(f"{UNIT_DIR}/{name}", text.replace(UNIT_EXE, exe).encode(), 0o644)


def install(role: Role, opts: Options, enroller: Enroller | None = None,
            out: Callable[[str], None] = print) -> int:
    plan = Plan(opts, out)
    _check(opts)
    if (opts.cloud or opts.token) and not (opts.cloud and opts.token and enroller):
        raise InstallError("enrollment needs both --cloud URL and --token=TOKEN",
                           fix="pass both, or neither and enroll later")
    plan.user(role)
    plan.directory(ETC, 0o755)
    plan.directory(role.state_dir, 0o700, USER if plan.real else "root")
    if role is CLOUD:
        # The LLM key goes here and nowhere else (edgekeeper-worker@.service).
        plan.file(f"{ETC}/worker.env", b"# ANTHROPIC_API_KEY=...\n", 0o600, replace=False)
    exe = _venv_exe(plan, role)
    cfg = _load_config(plan, role, _config(plan, role))
    _units(plan, role, exe)
    if enroller is not None and opts.cloud:
        _enroll(plan, role, cfg, enroller)
    elif role is DEVICE and cfg is not None and cfg.uplink.mode == "cloud" \
            and not (plan.path(str(cfg.device.state_dir)) / "enrollment.json").exists():
        # The unit would refuse to start (device.not_enrolled, exit 78): say so now.
        plan.report("note", "not enrolled: the service will not start until it is; run this "
                    "again with --cloud URL --token=TOKEN (token from `edgekeeper cloud "
                    "token`), or set [uplink] mode = \"local-only\"")
    plan.systemctl("daemon-reload")
    plan.systemctl("enable", *role.enable)
    out(f"{role.name} installed ({plan.changed} changes); start it: systemctl start "
        f"{' '.join(role.enable)}")
    return 0


def _enroll(plan: Plan, role: Role, cfg: config_mod.Config | None, enroller: Enroller) -> None:
    if cfg is None:
        plan.report("would", f"enroll with {plan.opts.cloud} into {role.state_dir}")
        return
    state = plan.path(str(cfg.device.state_dir))
    if (state / "enrollment.json").exists():
        plan.report("ok", f"enrolled ({state / 'enrollment.json'} exists; to enroll again, "
                    "remove it and pass a new token)")
        return

    def act() -> None:
        assert plan.opts.cloud and plan.opts.token
        enroller(plan.opts.cloud, plan.opts.token, state, cfg.device.id, cfg.uplink.ca_file)
        # The service user must own its keys, as if it had enrolled itself (runuser).
        if plan.real:
            for p in (state, *state.rglob("*")):
                shutil.chown(p, USER, USER)

    plan.step(True, f"enrollment of {cfg.device.id} with {plan.opts.cloud} into {state}", act)


def _check(opts: Options, *, source: bool = True) -> None:
    if opts.root == Path("/") and os.geteuid() != 0 and not opts.dry_run:
        raise InstallError("changing / needs root",
                           fix="run it with sudo, or try it with --dry-run or --root DIR")
    for need in ("examples", "systemd") if source else ():
        if not (opts.source / need).is_dir():
            raise InstallError(f"{opts.source} has no {need}/ folder",
                               fix="pass --source DIR: a checkout of edgekeeper")


def uninstall(role: Role, opts: Options, *, purge: bool, yes: bool,
              out: Callable[[str], None] = print) -> int:
    """Remove the units and the venv; keep config and state unless --purge --yes."""
    if purge and not yes:
        raise InstallError(f"--purge deletes {role.state_dir} (keys, outbox, queue, results) "
                           f"and {ETC}/{role.config}",
                           fix="add --yes to confirm, or drop --purge to keep them")
    _check(opts, source=False)
    plan = Plan(opts, out)
    present = [u for u in role.enable if plan.path(f"{UNIT_DIR}/{u.replace('@1.', '@.')}")
               .exists()]
    if present:
        plan.systemctl("disable", "--now", *present)
    for name in role.units:
        _remove(plan, f"{UNIT_DIR}/{name}")
    others = [u for u in ALL_UNITS if u not in role.units and plan.path(f"{UNIT_DIR}/{u}").exists()]
    if others:
        plan.report("ok", f"virtualenv {VENV} kept: {', '.join(others)} still use it")
    else:
        _remove(plan, VENV)
    if purge:
        _remove(plan, role.state_dir)
        _remove(plan, f"{ETC}/{role.config}")
        if role is CLOUD:
            _remove(plan, f"{ETC}/worker.env")
    else:
        plan.report("ok", f"kept {role.state_dir} and {ETC}/{role.config} "
                    "(--purge --yes removes them)")
    plan.systemctl("daemon-reload")
    out(f"{role.name} uninstalled ({plan.changed} changes)")
    return 0


def _remove(plan: Plan, target: str) -> None:
    p = plan.path(target)

    def act() -> None:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()

    plan.step(p.exists() or p.is_symlink(), f"remove {target}", act)


def add_commands(cmds: argparse._SubParsersAction[argparse.ArgumentParser], role: Role,
                 handler: Callable[..., int]) -> argparse.ArgumentParser:
    """``install`` and ``uninstall`` under ``edgekeeper device|cloud``; returns install's parser
    (the device adds --cloud/--token to it)."""
    p = cmds.add_parser("install", help=f"install the {role.name} as a systemd service "
                        "(user, dirs, venv, config, units); idempotent")
    _common(p)
    p.add_argument("--source", type=Path, default=None, metavar="DIR",
                   help="checkout with examples/ and systemd/ (default: this one, else "
                        "/opt/edgekeeper)")
    venv = p.add_mutually_exclusive_group()
    venv.add_argument("--venv-from", metavar="CURRENT|DIR",
                      help="reuse an environment (CURRENT: the running one) instead of "
                           f"creating {VENV}")
    venv.add_argument("--no-venv", action="store_true", help=f"do not create {VENV}")
    p.set_defaults(handler=handler, install_action="install")
    u = cmds.add_parser("uninstall", help=f"remove the {role.name}'s units and venv; "
                        "config and state are kept unless --purge --yes")
    _common(u)
    u.add_argument("--purge", action="store_true", help="also delete the state and config")
    u.add_argument("--yes", action="store_true", help="confirm --purge")
    u.set_defaults(handler=handler, install_action="uninstall")
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                   help="prefix every path with DIR (default /; a scratch dir to try it)")
    p.add_argument("--dry-run", action="store_true", help="print each step, change nothing")


def run(args: argparse.Namespace, role: Role, enroller: Enroller | None = None) -> int:
    """The CLI hook: ``args`` from add_commands."""
    root = args.root.resolve()
    if args.install_action == "uninstall":
        opts = Options(root, args.dry_run, default_source(), None, True)
        return uninstall(role, opts, purge=args.purge, yes=args.yes)
    token = getattr(args, "token", None)
    if token == "-":
        token = sys.stdin.readline().strip()
    opts = Options(root, args.dry_run, args.source or default_source(), args.venv_from,
                   args.no_venv, getattr(args, "cloud", None), token)
    return install(role, opts, enroller)


__all__ = ["CLOUD", "DEVICE", "InstallError", "Options", "install", "uninstall"]
