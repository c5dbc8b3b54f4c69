"""Pictures of a run: the loss curve, dev BLEU over time and the attention maps (matplotlib, Agg
backend: no display)."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(log, path, title="training loss"):
    """Training loss (and nll) per step, validation loss where measured, learning rate on a twin
    axis; `log` is the run's JSON log ({"train": [...], "valid": [...]})."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    train = log.get("train", [])
    if train:
        steps = [e["step"] for e in train]
        ax.plot(steps, [e["loss"] for e in train], label="train loss (label-smoothed)", lw=1)
        ax.plot(steps, [e["nll"] for e in train], label="train nll", lw=1, alpha=0.7)
    valid = log.get("valid", [])
    if valid:
        ax.plot([e["step"] for e in valid], [e["loss"] for e in valid], "o-", label="valid loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per target token")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if train:
        lr_ax = ax.twinx()
        lr_ax.plot(steps, [e["lr"] for e in train], color="gray", ls=":", lw=1, label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_ax.legend(loc="upper center", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_bleu_curve(log, path, title="dev BLEU"):
    """Dev BLEU against training time in minutes (the log's cumulative "elapsed", so a resumed run
    continues the same axis); the best point marked. The question it answers is what a given time
    budget buys, hence wall-clock time rather than steps."""
    plt = _pyplot()
    valid = [e for e in log.get("valid", []) if e.get("bleu") is not None and e.get("elapsed") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if valid:
        minutes = [e["elapsed"] / 60 for e in valid]
        bleu = [e["bleu"] for e in valid]
        ax.plot(minutes, bleu, "o-", label="dev BLEU")
        best = max(range(len(bleu)), key=bleu.__getitem__)
        ax.plot([minutes[best]], [bleu[best]], "*", ms=14, color="tab:red",
                label=f"best {bleu[best]:.2f} (step {valid[best]['step']})")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("BLEU")
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_attention(maps, path, src_labels, tgt_labels, layer=-1, batch_index=0):
    """One panel per head: a row each for encoder self-attention, decoder self-attention and
    encoder-decoder (cross) attention of layer `layer`. `maps` is model.attention_weights(...)."""
    plt = _pyplot()
    kinds = [("encoder_self", "encoder self", src_labels, src_labels),
             ("decoder_self", "decoder self", tgt_labels, tgt_labels),
             ("cross", "cross (decoder -> encoder)", tgt_labels, src_labels)]
    heads = maps["encoder_self"][layer].shape[1]
    fig, axes = plt.subplots(3, heads, figsize=(2.6 * heads, 8), squeeze=False)
    for row, (key, name, q_labels, k_labels) in enumerate(kinds):
        weights = maps[key][layer][batch_index].float().cpu()
        for h in range(heads):
            ax = axes[row][h]
            ax.imshow(weights[h, :len(q_labels), :len(k_labels)].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"{name}, head {h + 1}", fontsize=8)
            ax.set_xticks(range(len(k_labels)))
            ax.set_xticklabels(k_labels, fontsize=5, rotation=90)
            ax.set_yticks(range(len(q_labels)))
            ax.set_yticklabels(q_labels, fontsize=5)
    layers = len(maps["encoder_self"])
    fig.suptitle(f"attention weights, layer {layer % layers + 1} of {layers} (rows: queries, columns: keys)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
