"""The step-by-step recurrence of `pipeline.dropout.LoopRecurrent`, as one autograd Function.

Why the backward is hand-written: at batch 64 and hidden 32-64 an op costs more in dispatch than in
arithmetic, and plain autograd records about a dozen nodes per LSTM step, each replayed in the backward.
Here the forward runs unrecorded, in place in a few preallocated buffers, and the backward
(backpropagation through time) needs 2 to 7 ops per step: the activation derivatives are computed for
all steps at once before its loop, the weight gradients after it, one matmul each. Large fresh buffers
cost page faults, so the backward carries dL/dstate from step to step in two small ones.

Gates are in PyTorch's order (i, f, g, o), so the weights are those of `nn.LSTM` / `nn.RNN`. The state
is h for the RNN and [h | c] for the LSTM: width S = H or 2H.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def lstm_local_derivatives(acts, c_prev, tanh_c):
    """For all steps at once, from acts (B, T, 4H) (sigmoid of i, f, 2g, o), c(t-1) and tanh(c(t)) (B, T, H):
    d gate pre-activations (B, T, 4H) per unit of dL/dc(t) for i, f, g and of dL/dh(t) for o, and
    d h(t) / d c(t) (B, T, H), both before zoneout."""
    i, _, sg, o = acts.chunk(4, dim=2)
    d_gates = torch.addcmul(acts, acts, acts, value=-1)  # sigmoid' = a (1 - a)
    di, df, dg, do = d_gates.chunk(4, dim=2)
    di.mul_(torch.mul(sg, 2).sub_(1))  # times tanh(g)
    df.mul_(c_prev)
    dg.mul_(i).mul_(4)  # tanh'(g) = 4 sigmoid(2g) (1 - sigmoid(2g)), times i
    do.mul_(tanh_c)
    dh_dc = tanh_c * tanh_c
    torch.addcmul(o, o, dh_dc, value=-1, out=dh_dc)  # o (1 - tanh(c)^2)
    return d_gates, dh_dc


class Recurrence(torch.autograd.Function):
    """One-layer Elman RNN or LSTM over T steps from a zero state; gates x(t) W_ih^T + bias + fed(t) W_hh^T.

    In: x (B, T, F); w_ih (G, F); bias (G,), the sum of both biases (G = H, or 4H for the LSTM); w_hh (G, H);
    lstm; fed_mask (B, H) or None, multiplying h(t-1) where it is fed back, the same mask at every step;
    keep: None (no zoneout), a bool (T, B, S) tensor, True where a unit keeps its previous value exactly
    (training zoneout), or a float p, the state becoming p * old + (1 - p) * new (zoneout in eval).
    Out: h at every step, (B, T, H). Gradients flow to x, w_ih, bias and w_hh.
    """

    @staticmethod
    @torch.no_grad()  # as autograd runs it anyway; said here for torch.export, whose graph may run with grad on
    def forward(ctx, x, w_ih, bias, w_hh, lstm, fed_mask, keep):
        batch, steps, _ = x.shape
        hidden = w_hh.size(1)
        w_in, w_hh_t = w_ih, w_hh.t()  # (G, F), (H, G)
        if lstm:  # tanh(g) = 2 sigmoid(2g) - 1: with g's weights doubled, one sigmoid serves all four gates
            scale = w_hh.new_ones(4, hidden)
            scale[2] = 2
            scale = scale.view(-1)
            w_in, bias, w_hh_t = w_ih * scale[:, None], bias * scale, w_hh_t * scale
        acts = F.linear(x, w_in, bias)  # (B, T, G): input terms, then in place each step's activations
        states = x.new_zeros(steps + 1, batch, 2 * hidden if lstm else hidden)  # states[t]: after t steps
        state, h, gate = states.unbind(0), states[..., :hidden].unbind(0), acts.unbind(1)  # per-step views
        if lstm:
            tanh_c = x.new_empty(steps, batch, hidden)
            c, tc = states[..., hidden:].unbind(0), tanh_c.unbind(0)
            i, f, sg, o = (part.unbind(1) for part in acts.chunk(4, dim=2))  # sg: sigmoid(2g)
        zoned = keep if isinstance(keep, torch.Tensor) else None
        zoned_step = None if zoned is None else zoned.unbind(0)  # (B, S)
        for t in range(steps):
            fed = h[t] if fed_mask is None else h[t] * fed_mask
            gate[t].addmm_(fed, w_hh_t)
            if lstm:
                gate[t].sigmoid_()
                torch.mul(f[t], c[t], out=c[t + 1])
                c[t + 1].sub_(i[t]).addcmul_(i[t], sg[t], value=2)  # c = f c + i tanh(g)
                torch.tanh(c[t + 1], out=tc[t])
                torch.mul(o[t], tc[t], out=h[t + 1])
                new_state = state[t + 1]  # zoneout in place: the backward needs neither fresh h nor fresh c
            else:
                new_state = gate[t].tanh_()  # kept in acts for the backward
            if zoned is not None:  # training zoneout: an exact copy of the old value where zoned
                torch.where(zoned_step[t], state[t], new_state, out=state[t + 1])
            elif keep is not None:  # eval zoneout: p old + (1 - p) new
                torch.lerp(new_state, state[t], keep, out=state[t + 1])
            elif not lstm:
                state[t + 1].copy_(new_state)
        ctx.lstm, ctx.p = lstm, keep if zoned is None else None
        ctx.save_for_backward(x, w_ih, w_hh, fed_mask, zoned, states, acts, *((tanh_c,) if lstm else ()))
        return states[1:, :, :hidden].transpose(0, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h):  # grad_h (B, T, H) -> d x (B, T, F), d w_ih (G, F), d bias (G,), d w_hh (G, H)
        x, w_ih, w_hh, fed_mask, zoned, states, acts, *tanh_c = ctx.saved_tensors
        batch, steps, hidden = grad_h.shape
        width = states.size(2)
        zoneout = zoned is not None or ctx.p is not None
        if zoneout:  # kept (T, B, S): d state[t+1] / d state[t] by the zoneout copy; 1 - kept: by the update
            kept = zoned.view(torch.uint8).to(acts.dtype) if zoned is not None else acts.new_tensor(ctx.p)
            kept = kept.expand(steps, batch, width)
            kept_h = kept[..., :hidden].transpose(0, 1)  # (B, T, H), laid out as acts
        if ctx.lstm:
            # Each step multiplies its slice of d_gates in place by dL/dc(t) (i, f, g) or dL/dh(t) (o).
            c_prev, tanh_c = states[:-1, :, hidden:].transpose(0, 1), tanh_c[0].transpose(0, 1)  # (B, T, H)
            d_gates, dh_dc = lstm_local_derivatives(acts, c_prev, tanh_c)
            if zoneout:  # times 1 - kept, as x - x kept
                do = d_gates[..., 3 * hidden :]
                do.addcmul_(do, kept_h, value=-1)
                dh_dc.addcmul_(dh_dc, kept_h, value=-1)
                kept_c = kept[..., hidden:].unsqueeze(2).unbind(0)  # (B, 1, H)
                dc = grad_h.new_empty(batch, 1, hidden)  # dL/dc(t) before zoneout
            d_gates4, acts4 = d_gates.view(batch, steps, 4, hidden), acts.view(batch, steps, 4, hidden)
            d_cell, d_out = d_gates4[:, :, :3].unbind(1), d_gates4[:, :, 3:].unbind(1)  # (B, 3, H), (B, 1, H)
            f, dh_dc = acts4[:, :, 1:2].unbind(1), dh_dc.unsqueeze(2).unbind(1)  # (B, 1, H)
        else:
            d_gates = 1 - acts * acts  # (B, T, H): tanh' of the fresh state
            if zoneout:
                d_gates.addcmul_(d_gates, kept_h, value=-1)
        d_gate, grad_prev = d_gates.unbind(1), grad_h.unbind(1)  # (B, G), (B, H)
        if zoneout:
            kept_step = kept.unbind(0)  # (B, S)

        def parts(buffer):  # (B, S) -> itself, its h (B, H), its h and its c as (B, 1, H) (no c for the RNN)
            split = buffer.view(batch, -1, hidden)
            return buffer, buffer[:, :hidden], split[:, :1], split[:, 1:]

        # dL/dstate[t+1], complete at step t, and dL/dstate[t], written during it: two (B, S) buffers in turn.
        current, following = (parts(buffer) for buffer in grad_h.new_zeros(2, batch, width))
        current[1].copy_(grad_prev[-1])  # dL/dstate[T]: from the last output alone
        for t in reversed(range(steps)):
            d_state, _, dh, d_c = current
            if ctx.lstm:
                if zoneout:
                    torch.addcmul(d_c, d_c, kept_c[t], value=-1, out=dc)
                else:
                    dc = d_c
                dc.addcmul_(dh, dh_dc[t])
                d_cell[t].mul_(dc)
                d_out[t].mul_(dh)
            else:
                d_gate[t].mul_(d_state)
            if t == 0:
                break
            d_prev, d_prev_h, _, d_prev_c = following
            if fed_mask is None:
                torch.addmm(grad_prev[t - 1], d_gate[t], w_hh, out=d_prev_h)
            else:
                torch.addcmul(grad_prev[t - 1], d_gate[t] @ w_hh, fed_mask, out=d_prev_h)
            if ctx.lstm:
                torch.mul(dc, f[t], out=d_prev_c)
            if zoneout:
                d_prev.addcmul_(d_state, kept_step[t])
            current, following = following, current
        fed = states[:-1, :, :hidden].transpose(0, 1)  # (B, T, H)
        if fed_mask is not None:
            fed = fed * fed_mask[:, None]
        d_gates = d_gates.view(batch * steps, -1)  # (B T, G)
        # (A^T B)^T with the narrow matrix as A: several times faster here than B^T A
        d_w_hh = (fed.reshape(batch * steps, hidden).t() @ d_gates).t()
        d_w_ih = (x.reshape(batch * steps, -1).t() @ d_gates).t()
        d_x = (d_gates @ w_ih).view_as(x) if ctx.needs_input_grad[0] else None
        return d_x, d_w_ih, d_gates.sum(0), d_w_hh, None, None, None
