"""A torchvision classifier as an autotune workload: the whole contract in one file.

    python -m autotune --workload examples.torchvision_workload:make_workload \
        --workload-args '{"model": "resnet18", "image_size": 32}' --target-mem 4GB

The data are torchvision's ``FakeData`` (random images with labels, made in memory), so
the example runs anywhere without a download; swap in ``CIFAR10`` or an
``ImageFolder`` for real data. The workload is rebuilt from its factory in each CPU
trial's child process: its arguments must be JSON.
"""

from __future__ import annotations

from autotune.workload import Baseline, SupervisedWorkload


class TorchvisionClassifier(SupervisedWorkload):
    """Any ``torchvision.models`` constructor, cross-entropy, SGD with momentum."""

    name = "torchvision-classifier"
    reference_batch = 32
    reference_lrs = {"lr": 0.05}
    baseline = Baseline(batch_size=32, num_workers=2, precision="fp32")

    def __init__(self, model: str = "resnet18", image_size: int = 32, classes: int = 10,
                 samples: int = 512) -> None:
        import torchvision

        if not hasattr(torchvision.models, model):
            from autotune.errors import ConfigError

            raise ConfigError(f"torchvision.models has no {model!r}")
        self.model_name, self.image_size, self.classes = model, image_size, classes
        self.samples = samples
        self._data = None

    def fingerprint(self) -> dict:
        return {"model": self.model_name, "image_size": self.image_size, "classes": self.classes}

    def build_model(self):
        import torchvision

        return getattr(torchvision.models, self.model_name)(num_classes=self.classes)

    def build_optimizer(self, parameters, lrs):
        import torch

        return torch.optim.SGD(parameters, lr=lrs["lr"], momentum=0.9)

    def dataset(self):
        if self._data is None:
            import torchvision
            from torchvision.transforms import v2

            transform = v2.Compose([v2.ToImage(), v2.ToDtype(__import__("torch").float32, scale=True)])
            self._data = torchvision.datasets.FakeData(
                size=self.samples, image_size=(3, self.image_size, self.image_size),
                num_classes=self.classes, transform=transform, random_offset=0,
            )
        return self._data

    def loss(self, model, batch):
        import torch.nn.functional as F

        images, labels = batch
        return F.cross_entropy(model(images), labels)


def make_workload(**kwargs) -> TorchvisionClassifier:
    """The factory ``--workload examples.torchvision_workload:make_workload`` names."""
    return TorchvisionClassifier(**kwargs)
