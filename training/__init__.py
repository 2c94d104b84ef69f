"""Training recipes of RWKV-SAM: stage 1 distillation, stage 2 joint training, fine-tuning, evaluation.

Entry points: ``python -m training {distill,joint,finetune,eval} ...`` or ``rwkvsam train ...`` /
``rwkvsam eval ...``; the same commands run under ``torchrun --nproc_per_node N`` (DDP).
"""
