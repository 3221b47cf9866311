"""Benchmark: roll one release out to N loopback boards (one Debian sshd each), edgepack push vs
Ansible (ansible-core: copy + command modules, forks=20), same boards, same file, same install
command, in one run. Writes bench-results/fleet.json.

    .venv/bin/python scripts/bench_fleet.py [--boards 50] [--forks 20]

Each board has two state directories at release 1 (one per tool: the anti-rollback counter makes
a second install of the same release impossible on one state). Both tools send the same delta
bundle (r1 -> r2; edgepack chooses it by asking each board, Ansible is told to copy it) and run
`python -m device_agent --state DIR install FILE` on the board. Bytes: edgepack's own count of
payload bytes sent, and for both tools the loopback interface's byte counter over the run (all
SSH traffic in both directions, including Ansible's module uploads; other processes on the machine
may add a little).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def lo_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        if line.strip().startswith("lo:"):
            f = line.split(":", 1)[1].split()
            return int(f[0]) + int(f[8])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boards", type=int, default=50)
    ap.add_argument("--forks", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "fleet.json"))
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()

    from agent_helpers import bundle, golden_for, init_board, make_onnx, make_pki
    from device_agent.install import Agent
    from edgepack.ota.delta import make_delta_bundle
    from edgepack.fleet import Policy, Store, load_fleet, push
    from fleet_helpers import fleet_toml, keygen, make_boards, write_known_hosts

    ansible = shutil.which("ansible-playbook", path=str(Path(sys.executable).parent)) or shutil.which("ansible-playbook")
    if not ansible:
        print("ansible-playbook not found: .venv/bin/pip install ansible-core==2.19.14", file=sys.stderr)
        return 2
    td = Path(tempfile.mkdtemp(prefix="edgepack-bench-fleet-"))
    boards = []
    try:
        t_setup = time.perf_counter()
        pki = make_pki(td / "pki")
        m1 = make_onnx(td / "m1.onnx", seed=0, hidden=256)
        m2 = make_onnx(td / "m2.onnx", seed=0, hidden=256, drift=0.01)
        (td / "rel").mkdir()
        r1 = bundle(pki, td / "r1.bundle", m1, release=1, golden=golden_for(m1, td / "g1.npz"))
        r2 = bundle(pki, td / "rel" / "r2.bundle", m2, release=2, golden=golden_for(m2, td / "g2.npz"))
        delta = make_delta_bundle(r1, r2, td / "rel" / "r1-to-r2.bundle", trust=pki.board_trust(True),
                                  signer=pki.release[0]).path
        key = keygen(td / "client_key")
        boards = make_boards(td / "boards", a.boards, key.with_suffix(".pub"))
        states = {}
        for b in boards:
            b.sshd.start()
            for tool in ("edgepack", "ansible"):
                s = b.state.parent / f"state-{tool}"
                init_board(s, pki, trial_in_process=True, trial_runs=3)
                Agent(s).install(r1)
                states[(b.name, tool)] = s
        kh = write_known_hosts(td / "known_hosts", boards)
        setup_s = time.perf_counter() - t_setup
        results: dict = {}

        # ---------------------------------------------------------------- edgepack
        for b in boards:
            b.state = states[(b.name, "edgepack")]
        fl = load_fleet(fleet_toml(td / "fleet.toml", boards, key=key, known_hosts=kh, store=td / "fleet.db"))
        lo0 = lo_bytes()
        t0 = time.perf_counter()
        with Store(fl.store) as st:
            rep = push(r2, fl, policy=Policy(canary=0, wave_size="100%", concurrency=a.forks), store=st)
        e_wall = time.perf_counter() - t0
        e_lo = lo_bytes() - lo0
        ok = sum(b.result == "committed" for b in rep.boards)
        results["edgepack"] = {"wall_s": round(e_wall, 2), "committed": ok, "payload_bytes_sent": rep.bytes_sent,
                               "kinds": sorted({b.kind for b in rep.boards if b.kind}),
                               "loopback_bytes": e_lo, "concurrency": a.forks}
        print(f"edgepack: {ok}/{a.boards} committed in {e_wall:.1f} s, {rep.bytes_sent} payload bytes", file=sys.stderr)

        # ---------------------------------------------------------------- ansible
        inv = {"all": {"hosts": {}}}
        for b in boards:
            inv["all"]["hosts"][b.name] = {
                "ansible_host": "127.0.0.1", "ansible_port": b.sshd.port, "ansible_user": os.environ.get("USER", "root"),
                "ansible_ssh_private_key_file": str(key), "ansible_python_interpreter": sys.executable,
                "ansible_ssh_common_args": f"-o UserKnownHostsFile={kh} -o StrictHostKeyChecking=yes",
                "state_dir": str(states[(b.name, "ansible")]), "incoming": str(b.incoming.parent / "incoming-ansible")}
        (td / "inventory.json").write_text(json.dumps(inv))
        (td / "play.yml").write_text(f"""- hosts: all
  gather_facts: false
  tasks:
    - name: copy the bundle
      ansible.builtin.copy:
        src: {delta}
        dest: "{{{{ incoming }}}}/"
    - name: install it
      ansible.builtin.command:
        argv: [{sys.executable}, -m, device_agent, --state, "{{{{ state_dir }}}}", install, "{{{{ incoming }}}}/{delta.name}"]
""")
        (td / "ansible.cfg").write_text(f"[defaults]\nforks = {a.forks}\nhost_key_checking = True\n"
                                        f"stdout_callback = default\nretry_files_enabled = False\n")
        for b in boards:
            (b.incoming.parent / "incoming-ansible").mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "ANSIBLE_CONFIG": str(td / "ansible.cfg"), "ANSIBLE_HOME": str(td / "ansible-home"),
               "ANSIBLE_LOCAL_TEMP": str(td / "ansible-tmp"), "ANSIBLE_NOCOLOR": "1"}
        lo0 = lo_bytes()
        t0 = time.perf_counter()
        r = subprocess.run([ansible, "-i", str(td / "inventory.json"), str(td / "play.yml")], capture_output=True,
                           text=True, env=env, cwd=td)
        a_wall = time.perf_counter() - t0
        a_lo = lo_bytes() - lo0
        a_ok = sum(Agent(states[(b.name, "ansible")]).status()["active"]["release"] == 2 for b in boards)
        if r.returncode != 0:
            print(r.stdout[-3000:], r.stderr[-2000:], file=sys.stderr)
        results["ansible"] = {"wall_s": round(a_wall, 2), "committed": a_ok, "exit_code": r.returncode,
                              "payload_bytes_sent": delta.stat().st_size * a.boards, "loopback_bytes": a_lo,
                              "forks": a.forks, "modules": ["ansible.builtin.copy", "ansible.builtin.command"]}
        print(f"ansible: {a_ok}/{a.boards} committed in {a_wall:.1f} s", file=sys.stderr)
        import importlib.metadata as md
        out = {"benchmark": "fleet rollout of one release over loopback SSH", "boards": a.boards,
               "file": delta.name, "file_bytes": delta.stat().st_size, "full_bundle_bytes": r2.stat().st_size,
               "results": results, "ratio_edgepack_over_ansible_wall": round(e_wall / a_wall, 3),
               "setup_s": round(setup_s, 1),
               "versions": {"ansible-core": md.version("ansible-core"), "paramiko": md.version("paramiko"),
                            "openssh": subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()},
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
               "command": "python scripts/bench_fleet.py --boards %d --forks %d" % (a.boards, a.forks)}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2))
        return 0 if ok == a.boards and a_ok == a.boards else 1
    finally:
        for b in boards:
            b.sshd.kill()
        if not a.keep:
            shutil.rmtree(td, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
