"""Euler ODE sampler (Eq 1-2): shared timestep, both streams integrated, capture steps in sampling order."""

from __future__ import annotations

import torch

from omninft_fast.train.model import AVVelocityModel, Condition
from omninft_fast.train.sampler import euler_sample, time_grid


class PointMass(AVVelocityModel):
    """Exact velocity ``(x_t - x0) / t`` of data concentrated at ``x0`` per stream; records the times it sees."""

    def __init__(self, x0_video: torch.Tensor, x0_audio: torch.Tensor) -> None:
        super().__init__()
        self.x0_video, self.x0_audio = x0_video, x0_audio
        self.times: list[torch.Tensor] = []

    def forward(self, x_video: torch.Tensor, x_audio: torch.Tensor, t: torch.Tensor, cond: Condition) -> tuple:
        self.times.append(t.clone())
        tb = t[:, None, None]
        return (x_video - self.x0_video) / tb, (x_audio - self.x0_audio) / tb


class Steps:
    step = None

    def __init__(self) -> None:
        self.seen: list[int] = []

    def __setattr__(self, name: str, value: object) -> None:
        if name == "step":
            self.seen.append(value)
        object.__setattr__(self, name, value)


def test_time_grid() -> None:
    grid = time_grid(4)
    torch.testing.assert_close(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = time_grid(4, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and bool((shifted[1:-1] > grid[1:-1]).all())


def test_euler_lands_on_the_data_of_each_stream(gen: torch.Generator) -> None:
    x0_video, x0_audio = torch.randn(3, 5, 4, generator=gen), torch.randn(3, 7, 2, generator=gen)
    model = PointMass(x0_video, x0_audio)
    cond = Condition(torch.zeros(3, 1, 4), torch.zeros(3, 1, 2))
    capture = Steps()
    noise_video, noise_audio = torch.randn(3, 5, 4, generator=gen), torch.randn(3, 7, 2, generator=gen)
    video, audio = euler_sample(model, cond, noise_video, noise_audio, num_steps=5, capture=capture)
    torch.testing.assert_close(video, x0_video)
    torch.testing.assert_close(audio, x0_audio)
    assert capture.seen == [0, 1, 2, 3, 4]
    torch.testing.assert_close(torch.stack(model.times)[:, 0], time_grid(5)[:-1])
    assert all(bool((t == t[0]).all()) for t in model.times)  # one shared timestep for the batch
