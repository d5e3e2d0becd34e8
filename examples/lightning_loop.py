"""SAM / SSAM in PyTorch Lightning: manual optimization, the descent pass as the closure of opt.step().

    python examples/lightning_loop.py          # a tiny MLP on random data, on the CPU

Calling first_step / second_step on the optimizer directly skips Lightning's step: global_step stays 0 and
ModelCheckpoint(every_n_train_steps=...) never saves. Instead run pass 1 with manual_backward, then
opt.step(closure=descent): Lightning counts the step and hands the closure to SAM.step, which runs
first_step, descent() at w + eps, second_step. The SAM state (base optimizer, counters, masks) is saved in the
checkpoint and a resumed run continues exactly. SSAM-F's mask is refreshed from on_train_batch_start; under
strategy="ddp" every process holds rank 0's mask (ssam.py broadcasts it).
SAM-k / LookSAM-k (ascent_every=k): when not ascent_due, pass 1 is the step's only pass; descent() returns its
loss and SAM.step makes the step between ascents.
precision="16-mixed" (a GradScaler): Lightning calls the closure itself, then scaler.step(opt) without one,
which is SAM's second step (or the step between ascents). So descent() climbs first (first_step, after
recording pass 1's inf/NaN for the scaler, as examples/amp.py); opt.optimizer.restore() after opt.step() puts
w back if the scaler skipped it.
"""

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

import ssam


class SAMModule(L.LightningModule):
    def __init__(self, make_optimizer, fisher_data=None):
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        self.make_optimizer, self.fisher_data = make_optimizer, fisher_data

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())

    def on_train_batch_start(self, batch, batch_idx):  # SSAM-F: a new mask every update_interval steps
        sam = self.optimizers().optimizer
        if isinstance(sam, ssam.SSAMF) and sam.mask_update_due:
            sam.update_mask(self, self.fisher_data or [batch])

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()  # a LightningOptimizer around the SAM
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # "16-mixed": a GradScaler
        x, y = batch
        opt.zero_grad()
        loss = F.cross_entropy(self(x), y)
        self.manual_backward(loss)  # pass 1 at w

        def descent():  # pass 2 at w + eps: SAM.step runs first_step before it, second_step after
            if not opt.optimizer.ascent_due:  # ascent_every=k: no ascent this step, pass 1 is its only pass
                return loss
            if scaler is not None:  # 16-mixed: Lightning runs this, then scaler.step(opt): the second step
                scaler.unscale_(opt.optimizer.base_optimizer)  # pass 1's inf/NaN lowers the scale too
                opt.optimizer.first_step(zero_grad=True)  # eps = 0 after an inf/NaN
            with ssam.frozen_bn_stats(self):
                loss2 = F.cross_entropy(self(x), y)
            self.manual_backward(loss2)
            return loss2

        opt.step(closure=descent)  # Lightning counts it: global_step, checkpoints
        opt.optimizer.restore()  # w exactly if the scaler skipped the step; no-op otherwise
        return loss.detach()


def main(max_epochs=3):
    torch.manual_seed(0)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    module = SAMModule(
        lambda ps: ssam.SSAMF(ps, torch.optim.SGD, rho=0.05, num_samples=16, update_interval=4, lr=0.1)
    )
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, loader)
    print(f"global_step {trainer.global_step}, loss {F.cross_entropy(module(x), y).item():.4f}")


if __name__ == "__main__":
    main()
