"""Selection must be identical on every rank: rank 0 decides, the others receive."""

import torch


def broadcast_from_rank0(obj):
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj
