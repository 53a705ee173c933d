import torch
torch.manual_seed(0)
for dev in ['cuda', 'cpu']:
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GroupNorm(2, 8), torch.nn.Linear(8, 1)).to(dev)
    groups = [{'params': [p for p in m.parameters() if p.ndim > 1], 'weight_decay': 0.01},
              {'params': [p for p in m.parameters() if p.ndim <= 1], 'weight_decay': 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-2, fused=True)
    x = torch.randn(4, 8, device=dev)
    for step in range(6):
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = m(x).pow(2).mean()
        loss.backward()
        if step == 3:
            for p in m.parameters(): p.grad.fill_(float('nan'))
        gn = torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        fin = torch.isfinite(gn)
        opt.found_inf = (~fin).float()
        before = [p.detach().clone() for p in m.parameters()]
        opt.step(); opt.zero_grad(set_to_none=True)
        changed = sum(int((a != b).any()) for a, b in zip(before, m.parameters()))
        bad = sum(int((~torch.isfinite(p)).sum()) for p in m.parameters())
        st = [float(s['step']) for s in opt.state.values()][:2]
        print(dev, step, 'gn', float(gn), 'changed', changed, 'bad', bad, 'steps', st, 'dtype found_inf', opt.found_inf.dtype, opt.found_inf.device)
print(torch.__version__)
