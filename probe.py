"""A frozen encoder judged on features extracted once: k-NN accuracy and a linear probe, cheap enough to repeat."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import normalize
from devices import autocast


@torch.no_grad()
def extract_features(backbone, images, pool="cls", batch_size=1000, precision="fp32"):
    """The cls token (or mean patch token) of uint8 ``images``; compiled on a GPU (on a CPU, not worth it)."""
    was_training = backbone.training
    backbone.eval()
    forward = torch.compile(backbone.forward_features) if images.device.type == "cuda" else backbone.forward_features
    pooled = lambda tokens: (tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)).float()
    with autocast(images.device, precision):
        features = [pooled(forward(normalize(batch))) for batch in images.split(batch_size)]
    backbone.train(was_training)
    return torch.cat(features)


@torch.no_grad()
def knn_accuracy(train_features, train_labels, test_features, test_labels, k=20, temperature=0.07, chunk=1000):
    """Weighted k-NN on cosine similarity: each of the k nearest neighbours votes exp(similarity / T)."""
    train_features = F.normalize(train_features, dim=1)
    correct = torch.zeros((), device=test_labels.device)
    for query, labels in zip(test_features.split(chunk), test_labels.split(chunk)):
        similarity, neighbours = (F.normalize(query, dim=1) @ train_features.T).topk(min(k, len(train_features)), dim=1)
        votes = torch.zeros(len(query), int(train_labels.max()) + 1, device=query.device)
        votes.scatter_add_(1, train_labels[neighbours], (similarity / temperature).exp())
        correct += (votes.argmax(dim=1) == labels).sum()
    return correct.item() / len(test_labels)


def linear_probe_accuracy(train_features, train_labels, test_features, test_labels, epochs=100, lr=1e-3,
                          batch_size=4096, seed=0):
    """Test accuracy of a linear classifier (after a BatchNorm without affine) trained on frozen features."""
    generator = torch.Generator().manual_seed(seed)
    dim, device = train_features.shape[1], train_features.device
    with torch.random.fork_rng(devices=[]):  # the head's init leaves the training run's random stream untouched
        torch.random.default_generator.manual_seed(seed)
        head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, int(train_labels.max()) + 1)).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(epochs):
        order = torch.randperm(len(train_features), generator=generator).to(device)
        for index in order.split(batch_size):
            if len(index) > 1:  # BatchNorm in training mode needs two samples: skip a last batch of one
                loss = F.cross_entropy(head(train_features[index]), train_labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    head.eval()
    with torch.no_grad():
        return (head(test_features).argmax(dim=1) == test_labels).sum().item() / len(test_labels)


def evaluate_encoder(backbone, train_split, test_split, device, k=20, pool="cls", probe_epochs=0, precision="fp32"):
    """k-NN accuracy (and, with ``probe_epochs``, linear-probe accuracy) of a frozen backbone."""
    def features(split):  # (features, labels) of a split, on the device
        return extract_features(backbone, split.images.to(device), pool, precision=precision), split.labels.to(device)

    both = (*features(train_split), *features(test_split))  # what both evaluations take, train first
    results = {"knn_acc": knn_accuracy(*both, k)}
    if probe_epochs:
        results["probe_acc"] = linear_probe_accuracy(*both, probe_epochs)
    return results
