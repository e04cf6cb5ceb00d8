from twcheck import run_script_stages


def test_orbax_restore_in_a_new_process_equals_the_uninterrupted_run(tmp_path):
    """Linen and NNX pruning runs saved mid-run with Orbax, restored in a new process and
    continued, end bit for bit where the uninterrupted runs end; packed models (linen and NNX)
    saved and restored give the same outputs. See checkpoint_check.py."""
    run_script_stages("checkpoint_check.py", ("first", "resume"), tmp_path)
