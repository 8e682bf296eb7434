"""After a stop (a signal, a diverged loss, a failed export): messages that name only what
was written and a command that continues from it, and the lower learning rate that
``--resume`` accepts after a divergence (the schedule continues with the new base rate)."""

import shlex

# Rates a --resume may lower (never raise): a diverged run continues from its last good
# checkpoint with a smaller step. The changes are recorded in the config as "lr_changes".
LOWER_ON_RESUME = ("lr", "other_lr")


def lowered(key, new, old):
    """Whether ``--key new`` on --resume lowers the checkpoint's rate ``old``."""
    return key in LOWER_ON_RESUME and new is not None and old is not None and 0 < new < old


def record_lowered(merged, ckpt_cfg, key, iteration):
    """Note in ``merged`` (a run's config) that ``key`` went from the checkpoint's value down."""
    change = {"option": key, "from": ckpt_cfg[key], "to": merged[key], "iteration": iteration}
    merged["lr_changes"] = list(merged.get("lr_changes") or []) + [change]


def apply_base_rates(optimizer, fresh):
    """Give the groups of a restored ``optimizer`` the base rates of ``fresh`` (the same
    optimizer built from the run's config), so that lowered rates take effect."""
    for group, new in zip(optimizer.param_groups, fresh.param_groups):
        group["base_lr"] = new["base_lr"]


def resume_command(out, *extra):
    """The command that continues the run whose checkpoints are in ``out``."""
    return " ".join(["python -m addersr.train --resume --out", shlex.quote(str(out)), *extra])


def checkpoint_note(run):
    """What the checkpoint folder holds now, in words, with the command to continue."""
    if run.saved is None:
        return f"no checkpoint was written to {run.out} (nothing to continue from)"
    return (f"the checkpoint {run.out / 'last.pt'} (iteration {run.saved}) is kept; continue "
            f"with `{resume_command(run.out)}`")


def diverged_advice(run, problem, good):
    """The message of a run stopped by a non-finite loss or weights (``good``: the last
    iteration known finite)."""
    lower = f"{run.cfg['lr'] / 10:g}"
    head = f"{problem} between iterations {good + 1} and {run.iteration}; stopping. "
    if run.saved is None:
        return head + (f"No checkpoint was written to {run.out}: start the run again with a lower "
                       f"rate (e.g. --lr {lower}, 10x lower)")
    return head + (f"The last good checkpoint, {run.out / 'last.pt'} (iteration {run.saved}), is "
                   f"kept: continue it at a lower rate with `{resume_command(run.out, '--lr', lower)}` "
                   "(--resume accepts a lower --lr or --other-lr; the schedule continues with it)")


def stop_message(run, signame, exported):
    """The message of a run stopped cleanly by a signal."""
    if run.saved is None:
        return f"stopped by {signame} at iteration {run.iteration}: {checkpoint_note(run)}"
    written = f"checkpoint {run.out / 'last.pt'}" + (f" and weights {exported}" if exported else "")
    return (f"stopped by {signame} at iteration {run.iteration}: {written} written; continue with "
            f"`{resume_command(run.out)}`")


def export_failed(run, export, reason):
    """The message when the weights could not be exported at the end."""
    return (f"cannot export the weights to {export}: {reason}. "
            + (f"They are in {run.out / 'last.pt'} (iteration {run.saved}): export them with "
               f"`{resume_command(run.out, '--iters', str(run.saved), '--export', 'PATH')}`"
               if run.saved is not None
               else "No checkpoint holds them"))
