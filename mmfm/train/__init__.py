"""Pre-training and fine-tuning: objectives, the multi-task mixer, the trainer, LoRA and torchrun support.

```python
from mmfm.train import TrainConfig, train

config = TrainConfig.from_file("configs/train/demo.yaml", {"steps": 100})
final_dir = train(config)          # RUN/final: load it with mmfm.load
```
"""

from mmfm.train.config import TrainConfig, parse_overrides
from mmfm.train.finetune import freeze, load_adapter, merge_lora, save_adapter
from mmfm.train.trainer import Interrupted, Trainer, train

__all__ = [
    "Interrupted",
    "TrainConfig",
    "Trainer",
    "freeze",
    "load_adapter",
    "merge_lora",
    "parse_overrides",
    "save_adapter",
    "train",
]
