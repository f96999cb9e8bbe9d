"""An independent transcription of the paper's ``loralib`` AdaLoRA (SVDLinear, RankAllocator, compute_orth_regu).

loralib is not on the package index, so the parity test runs against this oracle, written in loralib's own
style — a walk over ``named_parameters()`` with per-name dicts — from its documented behaviour
(the README's Semantics section), independently of adalora_fast's reference package.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class OracleSVDLinear(nn.Linear):
    def __init__(self, in_features, out_features, r, lora_alpha=1, **kw):
        nn.Linear.__init__(self, in_features, out_features, **kw)
        self.r, self.lora_alpha = r, lora_alpha
        self.lora_A = nn.Parameter(self.weight.new_zeros((r, in_features)))
        self.lora_E = nn.Parameter(self.weight.new_zeros(r, 1))
        self.lora_B = nn.Parameter(self.weight.new_zeros((out_features, r)))
        self.ranknum = nn.Parameter(self.weight.new_zeros(1), requires_grad=False)
        self.ranknum.data.fill_(float(r))
        self.scaling = lora_alpha if lora_alpha > 0 else float(r)
        self.weight.requires_grad = False

    def forward(self, x):
        result = F.linear(x, self.weight, bias=self.bias)
        result += (x @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling / (self.ranknum + 1e-5)
        return result


def oracle_orth_regu(model, regu_weight=0.1):
    regu_loss, num_param = 0.0, 0
    for n, p in model.named_parameters():
        if "lora_A" in n or "lora_B" in n:
            para_cov = p @ p.T if "lora_A" in n else p.T @ p
            eye = torch.eye(*para_cov.size(), out=torch.empty_like(para_cov))
            regu_loss += torch.norm(para_cov - eye, p="fro")
            num_param += 1
    return regu_weight * regu_loss / num_param


class OracleRankAllocator:
    def __init__(self, model, lora_r, target_rank, init_warmup, final_warmup, mask_interval, beta1, beta2, total_step):
        self.initial_warmup, self.final_warmup, self.mask_interval = init_warmup, final_warmup, mask_interval
        self.beta1, self.beta2, self.total_step = beta1, beta2, total_step
        self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}
        self.total_rank = sum(p.size(0) for n, p in model.named_parameters() if "lora_A" in n)
        n_mats = len({n for n, _ in model.named_parameters() if "lora_A" in n})
        self.target_rank = target_rank * n_mats

    def schedule_threshold(self, step):
        if step <= self.initial_warmup:
            return self.total_rank, False
        if step > self.total_step - self.final_warmup:
            return self.target_rank, True
        mul_coeff = 1 - (step - self.initial_warmup) / (self.total_step - self.final_warmup - self.initial_warmup)
        curr_rank = int(self.target_rank + (self.total_rank - self.target_rank) * (mul_coeff**3))
        return curr_rank, step % self.mask_interval == 0

    def update_ipt(self, model):
        for n, p in model.named_parameters():
            if "lora_" in n:
                if n not in self.ipt:
                    self.exp_avg_ipt[n] = torch.zeros_like(p)
                    self.exp_avg_unc[n] = torch.zeros_like(p)
                with torch.no_grad():
                    self.ipt[n] = (p * p.grad).abs().detach()
                    self.exp_avg_ipt[n] = self.beta1 * self.exp_avg_ipt[n] + (1 - self.beta1) * self.ipt[n]
                    self.exp_avg_unc[n] = self.beta2 * self.exp_avg_unc[n] + (1 - self.beta2) * (
                        self.ipt[n] - self.exp_avg_ipt[n]
                    ).abs()

    def mask_to_target_rank(self, model, curr_rank):
        combine, singular = {}, {}
        for n, _ in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                score = self.exp_avg_ipt[n] * self.exp_avg_unc[n]
                comb = torch.mean(score, dim=1, keepdim=True) if "lora_A" in n else torch.mean(score, dim=0).view(-1, 1)
                combine.setdefault(n.replace("lora_A", "%s").replace("lora_B", "%s"), []).append(comb)
            if "lora_E" in n:
                singular[n.replace("lora_E", "%s")] = self.exp_avg_ipt[n] * self.exp_avg_unc[n]
        is_dict, all_is = {}, []
        for name_mat, parts in combine.items():
            sum_ipt = singular[name_mat].view(-1) + torch.cat(parts, dim=1).sum(dim=1).view(-1)
            is_dict[name_mat % "lora_E"] = sum_ipt.view(-1, 1)
            all_is.append(sum_ipt.view(-1))
        threshold = torch.kthvalue(torch.cat(all_is), self.total_rank - curr_rank)[0].item()
        ranks = {}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_E" in n:
                    p.data.masked_fill_(is_dict[n] <= threshold, 0.0)
                    ranks[n] = int((is_dict[n] > threshold).sum().item())
        return ranks

    def update_and_mask(self, model, global_step):
        if global_step < self.total_step - self.final_warmup:
            self.update_ipt(model)
        curr_rank, mask_ind = self.schedule_threshold(global_step)
        return self.mask_to_target_rank(model, curr_rank) if mask_ind else None

