from segkit import devices


def test_no_expectation_without_slurm_or_cuda_variables():
    assert devices.gpu_expectation({}) is None
    assert devices.missing_gpu_warning(0, {}) is None


def test_slurm_gpu_allocation_is_an_expectation():
    reason = devices.gpu_expectation({"SLURM_JOB_GPUS": "0,1"})
    assert reason and "SLURM_JOB_GPUS=0,1" in reason
    assert "gpu" in devices.gpu_expectation({"SLURM_JOB_GRES": "gpu:a100:2"})


def test_cuda_visible_devices_naming_devices_is_an_expectation():
    assert devices.gpu_expectation({"CUDA_VISIBLE_DEVICES": "0"})
    for hidden in ("", "-1", "none"):  # the usual ways of hiding every GPU are not a promise of one
        assert devices.gpu_expectation({"CUDA_VISIBLE_DEVICES": hidden}) is None


def test_warning_only_when_expected_and_none_visible():
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    warning = devices.missing_gpu_warning(0, env)
    assert warning.startswith("NO GPU VISIBLE") and "tensorflow[and-cuda]" in warning
    assert devices.missing_gpu_warning(2, env) is None
