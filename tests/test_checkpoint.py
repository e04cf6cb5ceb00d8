import pathlib
import subprocess
import sys


def test_orbax_restore_in_a_new_process_equals_the_uninterrupted_run(tmp_path):
    """Linen and NNX pruning runs saved mid-run with Orbax, restored in a new process and
    continued, end bit for bit where the uninterrupted runs end; packed models (linen and NNX)
    saved and restored give the same outputs. See checkpoint_check.py."""
    script = pathlib.Path(__file__).with_name("checkpoint_check.py")
    for stage in ("first", "resume"):
        done = subprocess.run([sys.executable, str(script), stage, str(tmp_path)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"checkpoint_check {stage} ok" in done.stdout, done.stdout
