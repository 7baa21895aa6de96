"""Issue: the Caffe build. pycaffe imports, nets run forward/backward on the
CPU with correct gradients, the tools run, and the config switch is right."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_configure():
    spec = importlib.util.spec_from_file_location("caffe_configure",
                                                  ROOT / "caffe-build" / "configure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_caffe_cpu_mode(caffe):
    print("caffe", caffe.__version__)
    assert caffe.__version__.startswith("1.0")
    assert "Sigmoid" in caffe.layer_type_list()


def latent_net(caffe, tmp_path, batch=4, dim=16, bits=48, classes=5):
    """fc -> InnerProduct(bits) -> Sigmoid -> classifier -> SoftmaxWithLoss."""
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[batch, dim]))
    n.label = L.Input(shape=dict(dim=[batch]))
    n.fc7 = L.InnerProduct(n.data, num_output=32, weight_filler=dict(type="gaussian", std=0.3))
    n.fc8_latent = L.InnerProduct(n.fc7, num_output=bits,
                                  weight_filler=dict(type="gaussian", std=0.3),
                                  bias_filler=dict(type="constant", value=0.1))
    n.latent = L.Sigmoid(n.fc8_latent)
    n.fc9_classifier = L.InnerProduct(n.latent, num_output=classes,
                                      weight_filler=dict(type="gaussian", std=0.3))
    n.loss = L.SoftmaxWithLoss(n.fc9_classifier, n.label)
    path = tmp_path / "latent_net.prototxt"
    path.write_text("force_backward: true\n" + str(n.to_proto()))
    return path


def test_latent_layer_gradient_matches_finite_differences(caffe, tmp_path):
    caffe.set_random_seed(3)
    net = caffe.Net(str(latent_net(caffe, tmp_path)), caffe.TEST)
    rng = np.random.default_rng(0)
    net.blobs["data"].data[...] = rng.normal(size=net.blobs["data"].data.shape)
    net.blobs["label"].data[...] = [0, 1, 2, 3]
    assert net.blobs["latent"].data.shape == (4, 48)

    def loss():
        return float(net.forward()["loss"])

    loss()
    net.backward()
    weights = net.params["fc8_latent"][0]
    analytic = weights.diff.copy()
    assert np.abs(analytic).max() > 0, "no gradient reached the latent layer"
    # Central differences on the largest-gradient entries and a few random ones
    # (float32: eps 1e-2 keeps round-off well below the signal).
    flat = np.argsort(np.abs(analytic).ravel())[-5:].tolist() + \
        rng.choice(analytic.size, 5, replace=False).tolist()
    eps = 1e-2
    for index in flat:
        i = np.unravel_index(index, analytic.shape)
        original = weights.data[i]
        weights.data[i] = original + eps
        up = loss()
        weights.data[i] = original - eps
        down = loss()
        weights.data[i] = original
        numeric = (up - down) / (2 * eps)
        assert numeric == pytest.approx(analytic[i], rel=2e-2, abs=2e-4), i


def test_caffe_time_runs_on_a_tiny_net(caffe, tmp_path):
    from dlbhc.nets.caffe_env import caffe_tool
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 8, 8]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3,
                           weight_filler=dict(type="xavier"))
    n.fc = L.InnerProduct(n.conv, num_output=3, weight_filler=dict(type="xavier"))
    proto = tmp_path / "tiny.prototxt"
    proto.write_text(str(n.to_proto()))
    out = subprocess.run([str(caffe_tool("caffe")), "time", "-model", str(proto),
                          "-iterations", "3"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, GLOG_minloglevel="0", GLOG_logtostderr="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Average Forward pass" in out.stderr


@pytest.mark.caffe
def test_tools_are_built():
    from dlbhc.nets.caffe_env import caffe_tool
    for tool in ("caffe", "convert_imageset", "compute_image_mean", "extract_features"):
        assert os.access(caffe_tool(tool), os.X_OK), tool


@pytest.mark.caffe
def test_import_caffe_with_nothing_exported(tmp_path):
    """The venv's python finds pycaffe and libcaffe by itself (.pth + rpath)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LD_LIBRARY_PATH", "CAFFE_ROOT")}
    out = subprocess.run([sys.executable, "-c", "import caffe, dlbhc; print(caffe.__version__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("1.0")


# ---- the config generator and the cache key ---------------------------------
PY = {"BOOST_PYTHON": "boost_python311", "PYTHON_LIBNAME": "python3.11",
      "PYTHON_INCLUDE": "/inc", "NUMPY_INCLUDE": "/np", "PYTHON_LIBDIR": "/lib"}


def config_lines(text):
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_default_config_is_cpu_only():
    configure = load_configure()
    lines = config_lines(configure.render_config(python=PY))
    assert "CPU_ONLY := 1" in lines
    assert not any(line.startswith("USE_CUDNN") for line in lines)
    assert not any(line.startswith("CUDA_ARCH") for line in lines)
    assert "BLAS := open" in lines


def test_gpu_cudnn_config_has_modern_arch():
    configure = load_configure()
    text = configure.render_config(gpu=True, cudnn=True, python=PY, cuda_dir="/nonexistent")
    lines = config_lines(text)
    assert not any(line.startswith("CPU_ONLY") for line in lines)
    assert "USE_CUDNN := 1" in lines
    arch = text[text.index("CUDA_ARCH :="):].split("\n\n")[0]
    archs = {int(a) for a in __import__("re").findall(r"code=sm_(\d+)", arch)}
    assert archs and min(archs) >= 70 and 90 in archs  # Volta .. Hopper
    assert "compute_20" not in text and "compute_30" not in text


def test_gpu_config_without_cudnn():
    configure = load_configure()
    lines = config_lines(configure.render_config(gpu=True, python=PY, cuda_dir="/nonexistent"))
    assert not any(line.startswith(("CPU_ONLY", "USE_CUDNN")) for line in lines)


def test_cudnn_without_gpu_is_refused():
    configure = load_configure()
    with pytest.raises(ValueError, match="GPU=1"):
        configure.render_config(cudnn=True, python=PY)


def test_cache_key_follows_the_config():
    configure = load_configure()
    toolchain = ["g++ 12", "libprotoc 3.21", "3.11.7", "2.4"]
    cpu = configure.cache_key(configure.render_config(python=PY), toolchain)
    assert cpu == configure.cache_key(configure.render_config(python=PY), toolchain)
    gpu = configure.cache_key(configure.render_config(gpu=True, python=PY,
                                                      cuda_dir="/nonexistent"), toolchain)
    other_numpy = configure.cache_key(configure.render_config(python=PY),
                                      toolchain[:3] + ["2.5"])
    assert len({cpu, gpu, other_numpy}) == 3
