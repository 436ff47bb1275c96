"""Install metadata. Pins live here: the torch pair is capped by this machine's pip
(CUDA build from local disk); DALI and FFCV are extras so a GPU box without them
can still `pip install -e .` and use the torchvision/resident loaders."""
from setuptools import find_packages, setup

# engine.export: ONNX (torch's torch.export-based exporter needs onnx + onnxscript; the check
# runs onnxruntime) and safetensors. The tests exercise them, so `test` pulls them in too.
EXPORT = ["onnx>=1.16", "onnxscript>=0.3", "onnxruntime>=1.18", "safetensors>=0.4"]

setup(
    name="fasttrain",
    version="0.1.0",
    description="High-throughput data loading + compiled training for small image classifiers",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*",
                                    "loaders", "loaders.*", "benchmarks", "benchmarks.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",
        "torchvision>=0.26",
        "numpy",
        "pillow",
        "tqdm",
        "matplotlib",
        "pyyaml",
        "webdataset>=1.0.2",           # --data webdataset: shards (brings braceexpand)
        "braceexpand",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "ffcv": ["ffcv==1.0.2", "numba", "opencv-python-headless"],
        "tensorboard": ["tensorboard"],
        "export": EXPORT,
        "test": ["pytest", "pytest-timeout", "tensorboard", *EXPORT],
    },
)
