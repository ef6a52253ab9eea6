"""Process-group setup for torchrun (and plain `python`, a world of 1): the Dist handle every module passes around."""
import dataclasses
import datetime
import os
import socket

import torch
import torch.distributed as tdist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclasses.dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None = None  # the 1-D FSDP mesh; None: build_model makes one on `device`


def setup_distributed(timeout_s: float = 3600) -> Dist:
    """Init the default process group -- on CUDA `cpu:gloo,cuda:nccl`, on CPU gloo -- with a timeout of
    timeout_s for every collective. Under plain `python` (no torchrun env) it becomes a world of 1, so the
    FSDP2 code paths are the same as under torchrun."""
    if "RANK" not in os.environ:
        with socket.socket() as s:  # a free port for the world-of-1 rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0"  # (set by torchrun)
    if restarts and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # Seen with torch 2.13: restarted workers share the agent's store with the failed attempt, under the same
        # "default_pg" keys, so init_process_group read a dead peer's address or a full barrier and hung
        # (pytorch#135712). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives each attempt a fresh store.
        raise SystemExit("error: torchrun --max-restarts needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the "
                         "environment; without it a restarted job can hang")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    timeout = datetime.timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # NCCL serves only CUDA tensors ("No backend type associated with device type cpu"). train.py puts its
        # own scalars on the device (no host round trip); the gloo half serves whatever reaches the group
        # from the CPU all the same -- DCP's plan exchange, object collectives, a future host-side counter.
        tdist.init_process_group("cpu:gloo,cuda:nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        tdist.init_process_group("gloo", timeout=timeout)
    mesh = init_device_mesh(device.type, (world_size,))
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device, mesh=mesh)


def teardown_distributed() -> None:
    """Barrier, then destroy: gloo can abort at exit if one rank tears down while another still talks."""
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def max_over_ranks(n: int, device) -> int:
    """The largest n over all ranks (one all-reduce): e.g. the micro-batch count every rank must run under FSDP."""
    t = torch.tensor([float(n)], device=device)                                       # [1]
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())


def print0(*args, **kwargs) -> None:
    if not tdist.is_initialized() or tdist.get_rank() == 0:
        print(*args, **kwargs, flush=True)

