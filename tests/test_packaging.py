"""The workbench as a user installs it: every package folder ships, and `scope app` serves the
explorer from a wheel installed into a fresh virtual environment (no checkout around it)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from served import free_port, wait_served

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    folders = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "scope").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert folders <= listed, f"add {sorted(folders - listed)} to [tool.setuptools] packages"
    pages = {"scope.explorer", "scope.explorer.views"}
    assert pages <= listed  # app/ ships as scope.explorer


@pytest.mark.slow
def test_scope_app_serves_from_an_installed_wheel(tmp_path, app_store):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         str(ROOT), "-w", str(wheels)],
        check=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    (wheel,) = wheels.glob("*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # the workbench from the wheel alone; its dependencies from this environment's packages
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    py = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
         str(wheel)],
        check=True, timeout=600,
    )  # fmt: skip
    where = subprocess.run(
        [str(py), "-c", "import scope.cli.serve as s; print(s.app_script())"],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=True,
    ).stdout.strip()  # fmt: skip
    assert where == str(venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
                        / "site-packages" / "scope" / "explorer" / "Home.py")  # fmt: skip
    port = free_port()
    log = tmp_path / "app.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(venv / "bin" / "scope"), "app", "--store", str(app_store), "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            wait_served(url, proc, log)
            if CHROMIUM is None:
                pytest.skip("chromium is not installed: served, but the page is not checked")
            from playwright.sync_api import sync_playwright

            with sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
                )
                page = browser.new_page()
                page.set_default_timeout(120_000)
                page.goto(url)
                page.get_by_text("Feature density").wait_for()  # the overview, from the wheel
                assert page.get_by_text("L2.res.256").count() > 0
                browser.close()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
