"""Progress bars only on a terminal (issue 30): a log redirected to a file must not fill with
carriage-return redraws, and a user's explicit "no progress" still holds on a terminal."""
from __future__ import annotations

import io
import os


def test_no_carriage_return_bar_when_stderr_is_not_a_terminal(tmp_path, capfd):
    """pytest's capture is a pipe/file, not a TTY: a redirected log must hold no ``\\r``
    redraws (the data writers' bar is the one every ``prepare`` shows)."""
    from mixpipe.data.writers import parallel_map

    assert not os.isatty(2)
    capfd.readouterr()
    got = parallel_map(lambda chunk: [x * 2 for x in chunk], [[1, 2], [3]], workers=1,
                       total=3, desc="check")
    assert got == [[2, 4], [6]]
    printed = capfd.readouterr()
    assert "\r" not in printed.err and "check" not in printed.err


def test_progress_bar_helper_keeps_explicit_choice():
    """On a terminal the bar shows unless the user turned it off."""
    from mixpipe.progress import progress_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    shown, off, piped = Terminal(), Terminal(), io.StringIO()
    for stream, show in ((shown, True), (off, False), (piped, True)):
        with progress_bar(total=2, desc="bar", file=stream, show=show, mininterval=0) as bar:
            bar.update(2)
    assert "\r" in shown.getvalue() and "bar" in shown.getvalue()
    assert off.getvalue() == "" and piped.getvalue() == ""



def test_fits_bar_stays_out_of_a_log(capsys):
    """fit's own bar (the one every benchmark arm draws) follows the same rule: into a captured,
    non-terminal stderr it draws nothing, though progress is on."""
    import numpy as np
    import torch

    from mixpipe.core.policies.none import NoneSettings
    from mixpipe.server import InProcessService
    from mixpipe.torch import MixedLoader
    from mixpipe.train import fit
    from mixpipe.train.models import SmallResNet, SmallResNetSettings

    class Data:
        images = np.random.default_rng(0).integers(0, 255, (16, 16, 16, 3), dtype=np.uint8)

        def __len__(self) -> int:
            return 16

        def __getitem__(self, i: int):
            return self.images[i], i % 2

    service = InProcessService(16, policy=NoneSettings(), seed=0)
    loader = MixedLoader(Data(), service, batch_size=8, size=(16, 16), stride=8, seed=0)
    model = SmallResNet(SmallResNetSettings(num_classes=2, width=4))
    fit(model, loader, torch.optim.SGD(model.parameters(), lr=0.01), 1, progress=True)
    assert "\r" not in capsys.readouterr().err
