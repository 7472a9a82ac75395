"""The typical mistakes of the exercises, each with the hint a learner sees when an answer matches it."""

from __future__ import annotations

__all__ = ["MISTAKES"]

#: Typical mistakes, each with the hint shown when a learner's answer matches it.
MISTAKES: dict[str, str] = {
    # InfoNCE and the MoCo step
    "positive_not_first": "The positive is not at index 0. Put l_pos first, logits = cat([l_pos, l_neg], dim=1): "
                          "then the label of every row is 0.",
    "temperature_twice": "The temperature is applied twice (for example q / T and then logits / T). Divide by T once.",
    "no_temperature": "The logits are not divided by the temperature T.",
    "temperature_multiplied": "The logits are multiplied by T; divide them by T.",
    "not_normalised": "The features are not L2-normalised. Normalise q and k along the feature dimension, "
                      "F.normalize(x, dim=1), so that a dot product is a cosine similarity.",
    "normalised_wrong_dim": "The features are normalised along the batch (dim=0). Each row is one feature vector: "
                            "F.normalize(x, dim=1).",
    "labels_not_zero": "The labels must all be 0: the positive is column 0 of every row, "
                       "torch.zeros(N, dtype=torch.long) (arange(N) would be the layout of in-batch negatives).",
    "labels_dtype": "The labels are zeros of the wrong dtype. F.cross_entropy takes class indices as a long (int64) "
                    "tensor and refuses float, int32 or bool ones: torch.zeros(N, dtype=torch.long).",
    "loss_not_mean": "The loss is summed over the batch; average it (F.cross_entropy averages by default).",
    "key_not_detached": "A gradient reaches the key encoder: the key is not detached. Compute the keys under "
                        "torch.no_grad() (or .detach() them); the key encoder moves only by the momentum update.",
    "queries_without_grad": "No gradient reaches the query encoder. Compute q with gradients (not under "
                            "torch.no_grad(), not detached); only the keys are detached.",
    "query_detached_in_negatives": "The logits are right but their gradient is not: q is detached (or under "
                                   "torch.no_grad()) in the negative logits, so the loss never pushes q away from "
                                   "the queue. Use the same q, with its gradient, in l_pos and in l_neg.",
    "query_detached_in_positive": "The logits are right but their gradient is not: q is detached (or under "
                                  "torch.no_grad()) in the positive logit, so the loss never pulls q towards its key. "
                                  "Use the same q, with its gradient, in l_pos and in l_neg.",
    "key_encoder_eval": "The keys come from the key encoder in eval mode, so its BatchNorm used running statistics. "
                        "MoCo runs encoder_k in train mode, as it finds it (BN statistics of the batch it sees; that "
                        "is what the shuffle is about): do not call encoder_k.eval().",
    "mode_changed": "The function switched an encoder between train and eval mode and left it so: its BatchNorm "
                    "then behaves differently from the next step on. Leave .train()/.eval() to the caller.",
    "keys_before_momentum": "The keys were computed before the momentum update. MoCo first updates the key encoder, "
                            "then computes the keys with it.",
    "keys_from_query_encoder": "The keys come from the query encoder; they must come from the key encoder, encoder_k.",
    "enqueue_before_logits": "The queue was updated before the logits were computed, so the batch's keys also act "
                             "as their own negatives. Compute the logits first, then enqueue.",
    "queue_not_cloned": "The logits keep a reference to the queue, which the enqueue then overwrites in place, so "
                        "the backward pass fails. Use a copy as the negatives: queue.clone().detach(), as MoCo does.",
    # the margin loss
    "labels_swapped": "The labels are swapped. Y = 0 marks a similar pair (pulled together: ½·D²), Y = 1 a "
                      "dissimilar pair (pushed apart: ½·max(0, margin − D)²).",
    "labels_ignored": "The labels y are not used: pairs with y = 0 take the similar term, pairs with y = 1 the "
                      "dissimilar term.",
    "missing_half": "A factor ½ is missing: L = (1 − Y)·½·D² + Y·½·max(0, margin − D)².",
    "hinge_not_clamped": "The dissimilar term is not clamped at 0. Use max(0, margin − D)², "
                         "torch.clamp(margin - D, min=0) ** 2: a pair farther apart than the margin costs nothing.",
    "hinge_on_squared_distance": "The hinge uses D² where it needs D. The dissimilar term is ½·max(0, margin − D)² "
                                 "with D = ‖x1 − x2‖ (take the square root of the squared distance).",
    "hinge_not_squared": "The dissimilar term is not squared: ½·max(0, margin − D)².",
    "distance_not_squared": "The similar term uses D where it needs D²: ½·D².",
    "margin_ignored": "The margin argument is not used (your result matches margin = 1).",
    "detached": "The result is cut off from autograd (.item(), .detach(), numpy or torch.no_grad() inside): a loss "
                "must stay differentiable.",
    "not_a_tensor": "Return a torch tensor (a 0-dimensional tensor for a loss), not a Python number: .item() cuts "
                    "the gradient.",
    # the chance loss
    "chance_forgot_positive": "That is ln(K): the softmax has K + 1 candidates, the positive and the K negatives.",
    "chance_log_base": "Use the natural logarithm (math.log): the cross-entropy is measured in nats.",
    "chance_probability": "That is the probability of the positive, 1 / (K + 1). The loss is its negative log.",
    "chance_sign": "The sign is wrong: the loss is −log(1 / (K + 1)) = ln(K + 1), which is positive.",
    # the memory bank
    "bank_momentum_reversed": "The momentum is applied the wrong way round: m weighs the old entry, "
                              "new = m·old + (1 − m)·feature.",
    "bank_not_renormalised": "The new entries are not L2-normalised. A mix of two unit vectors is shorter than 1: "
                             "F.normalize(new, dim=1) before writing it back.",
    "bank_ignores_index": "The rows written are not memory[index]: the i-th feature of the batch belongs to row "
                          "index[i] of the bank.",
    "bank_other_rows": "Rows outside index changed: only the entries of the batch's samples are rewritten.",
    "not_updated_in_place": "The tensor passed in is unchanged. Write into it (memory[index] = …, queue[:, cols] = …) "
                            "instead of building and returning a new one.",
    "not_detached": "What was written is still attached to autograd. Write detached values (features.detach(), or "
                    "the whole update under torch.no_grad()): a bank or a queue stores numbers, not a graph.",
    # the queue
    "pointer_off_by_one": "The queue pointer is off by one. After N keys written from column ptr, the next free "
                          "column is (ptr + N) % K.",
    "pointer_not_wrapping": "The queue pointer does not wrap around. Columns are taken modulo K: keys that run past "
                            "column K − 1 go to columns 0, 1, …, and the new pointer is (ptr + N) % K.",
    "queue_reset_instead_of_wrap": "When the batch runs past the end, the batch is written again from column 0. The "
                                   "keys that fit go to the end, the rest to columns 0, 1, …, so that the oldest keys "
                                   "are overwritten first (the official code sidesteps this by requiring K % N == 0).",
    "queue_ignores_pointer": "The keys are written from column 0 every time: start at column ptr.",
    "pointer_not_int": "The new pointer is a column index: return an int (or an integer tensor), (ptr + N) % K. A "
                       "float cannot index the queue at the next call.",
    "keys_as_rows": "The queue holds keys as columns, (C, K), while keys is (N, C): write keys.T, "
                    "queue[:, cols] = keys.T.",
    "keys_reversed": "The keys are written in reverse order: key i goes to column (ptr + i) % K.",
    # the momentum update
    "momentum_reversed": "The momentum is applied the wrong way round: θk ← (1 − m)·θk + m·θq. With m close to 1 the "
                         "key encoder keeps most of its own weights: θk ← m·θk + (1 − m)·θq.",
    "query_updated": "The query encoder was changed (θq ← …). Only the key encoder moves, θk ← m·θk + (1 − m)·θq; "
                     "θq is changed by the optimizer alone.",
    "parameters_replaced": "The key encoder's Parameter objects were replaced by new ones (a new nn.Parameter, "
                           "setattr, or a new module). Whatever holds the old ones (an optimizer, DDP, hooks, a tensor "
                           "list gathered for a fused update) keeps updating stale tensors, and a new nn.Parameter "
                           "requires grad again. Update the existing parameters: p_k.mul_(m).add_(p_q, alpha=1 - m).",
    "shares_storage": "encoder_k's parameters now share memory with encoder_q's (p_k.data = p_q.data, or "
                      "p_k.set_(p_q)): every optimizer step on θq then moves θk too. Copy the values: p_k.copy_(p_q).",
    "momentum_not_no_grad": "The momentum update is recorded by autograd. Run it under torch.no_grad(): the key "
                            "encoder gets no gradient history.",
    "momentum_buffers": "BatchNorm's running statistics were averaged too. MoCo's update covers the parameters only "
                        "(encoder.parameters()); the key encoder's statistics come from its own forward passes.",
    "momentum_missing": "The key encoder did not move: θk ← m·θk + (1 − m)·θq comes first in every step.",
    # the shuffle
    "shuffle_not_undone": "The shuffle is not undone: the keys come back in shuffled order, so key i no longer "
                          "belongs to query i. Reorder them with the inverse permutation, argsort(idx_shuffle).",
    "unshuffle_with_shuffle_index": "The keys are reordered with the shuffle permutation itself, which shuffles them "
                                    "a second time. Undo it with the inverse permutation, argsort(idx_shuffle).",
    "not_shuffled": "The batch reaches the encoder in its original order. Shuffle it first: "
                    "im_k[idx_shuffle] with idx_shuffle = torch.randperm(N).",
    "one_encoder_call": "Encode the whole shuffled batch in one call to the encoder: BatchNorm's statistics come "
                        "from the batch it sees, and that is what the shuffle is about.",
    # anything else
    "raised": "Your function raised an error on this case (shown above).",
    "wrong_return": "The function does not return what the exercise asks for.",
}

