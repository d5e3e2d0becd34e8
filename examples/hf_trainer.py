"""SAM / SSAM-F / SSAM-D in the Hugging Face Trainer: a subclass whose training_step runs both passes.

    python examples/hf_trainer.py          # a tiny BERT built from a config (no download), random tokens, CPU

training_step: pass 1 at w, first_step, pass 2 at w + eps. Trainer then does what it always does: clips the
gradient it finds (the descent gradient: clipping pass 1 would change nothing, eps is normalized), calls
optimizer.step() (SAM.step without a closure: w back exactly, base step), steps the LR schedule (the groups
are shared with the base optimizer), zeroes the gradients, counts global_step, saves and resumes the SAM state
with the optimizer's. SSAM-F's mask is refreshed from the batch as it comes (a dict with padding; each
sample's Fisher uses its own attention_mask). gradient_accumulation_steps > 1 is refused on the first
micro-batch, before anything changes: Trainer hands training_step one micro-batch at a time, and SAM's ascent
needs pass 1 over all of them before first_step (examples/accumulation.py accumulates by hand).
SAM-k / LookSAM-k (ascent_every=k): when not sam.ascent_due, pass 1 is the step's only pass and Trainer's
optimizer.step() is the step between ascents (LookSAM adds g_v there).
fp16 (GPU; not run by the tests: Trainer has no GradScaler on the CPU): pass 1's inf/NaN is recorded for the
scaler as in examples/amp.py, and a step the scaler skips is restored to w by a callback.
"""

import tempfile

import torch
import transformers

import ssam


class RestoreSkipped(transformers.TrainerCallback):
    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        getattr(optimizer, "optimizer", optimizer).restore()  # w exactly if GradScaler skipped the step


class SAMTrainer(transformers.Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(RestoreSkipped)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.gradient_accumulation_steps != 1:  # both passes per micro-batch would be k SAM ascents
            raise ValueError(
                f"gradient_accumulation_steps={self.args.gradient_accumulation_steps}: SAMTrainer takes 1 (a "
                "larger per_device_train_batch_size, or examples/accumulation.py's loop to accumulate)"
            )
        model.train()
        inputs = self._prepare_inputs(inputs)
        sam = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps the SAM
        if isinstance(sam, ssam.SSAMF) and sam.mask_update_due:
            sam.update_mask(self.accelerator.unwrap_model(model), [inputs])  # the inner model, never DDP
        loss = model(**inputs).loss
        self.accelerator.backward(loss)  # pass 1 at w
        if (
            not sam.ascent_due
        ):  # ascent_every=k: no ascent this step; Trainer clips pass 1, then optimizer.step()
            return loss.detach()
        if self.accelerator.scaler is not None:  # fp16: pass 1's inf/NaN lowers the scale too
            self.accelerator.scaler.unscale_(sam.base_optimizer)
        sam.first_step(zero_grad=True)  # w + eps
        with ssam.frozen_bn_stats(model):
            loss = model(**inputs).loss
        self.accelerator.backward(loss)  # pass 2 at w + eps; Trainer clips it, then optimizer.step()
        return loss.detach()


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def token_data(n=32, length=12, seed=0):
    """Dicts of input_ids, attention_mask (right padding: each sample its own length) and labels."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    mask = (torch.arange(length) < lengths[:, None]).long()
    ids = torch.randint(1, 64, (n, length), generator=g) * mask  # 0: the pad token
    labels = torch.randint(0, 2, (n,), generator=g)
    return [dict(input_ids=i, attention_mask=m, labels=lab) for i, m, lab in zip(ids, mask, labels)]


def arguments(output_dir, max_steps, **kwargs):
    """Trainer's own clipping and linear LR schedule; the optimizer's lr is the schedule's start."""
    defaults = dict(
        per_device_train_batch_size=8, lr_scheduler_type="linear", max_grad_norm=1.0, use_cpu=True
    )
    defaults.update(
        train_sampling_strategy="sequential", report_to=[], disable_tqdm=True, logging_strategy="no"
    )
    defaults.update(save_strategy="no")
    return transformers.TrainingArguments(
        output_dir=output_dir, max_steps=max_steps, **dict(defaults, **kwargs)
    )


def main(steps=8):
    model = tiny_bert()
    opt = ssam.SSAMD(
        model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, total_steps=steps, seed=0, lr=0.1
    )
    with tempfile.TemporaryDirectory() as out:
        trainer = SAMTrainer(
            model=model, args=arguments(out, steps), train_dataset=token_data(), optimizers=(opt, None)
        )
        trainer.train()
    print(
        f"global_step {trainer.state.global_step}, SAM steps {opt.steps}, lr {opt.param_groups[0]['lr']:.4f}"
    )


if __name__ == "__main__":
    main()
