"""X-LXMERT k-means: equality with upstream's run_kmeans.py method, sharded assignment, file names, loader reads.

"Upstream" below is run_kmeans.py's method re-stated in this file: every group in h5py key order added
into one zeroed f32 [N*64, D] array, ``faiss.Kmeans(d, k, niter=...).train(x)``, ``IndexFlatL2`` +
``search(x, 1)`` over the whole target, ``np.save`` and ``pickle.dump`` of ``I[i*64:(i+1)*64].squeeze()``.
"""

from __future__ import annotations

import io
import pickle
import tracemalloc

import faiss
import h5py
import numpy as np
import pytest
import torch

from vlprep import VlprepError, kmeans, storage
from vlprep.formats import clusters, xlxmert_h5

DIM = 48  # above the dims (<= 32) for which faiss has fused top-1 kernels: the BLAS path as at 2048


def make_grid_h5(path, n_images, *, seed=0, dim=DIM, prefix="img"):
    """Clustered grid features, groups created in a shuffled order (h5py lists them sorted)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, dim)).astype(np.float32) * 4
    stems = [f"{prefix}{i:05d}" for i in range(n_images)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for i in rng.permutation(n_images):
            cells = centres[rng.integers(0, 12, 64)] + rng.standard_normal((64, dim), dtype=np.float32)
            cells[rng.random((64, dim)) < 0.05] = -0.0  # negative zeros, which upstream's load turns positive
            f.create_group(stems[i])["features"] = cells.reshape(8, 8, dim)
    return str(path)


def upstream_load(path, grid_size=8, d=DIM):
    with h5py.File(path, "r") as f:
        img_ids = list(f.keys())
        data = np.zeros((len(img_ids) * grid_size**2, d), dtype=np.float32)
        for i, img_id in enumerate(img_ids):
            features = np.zeros((grid_size, grid_size, d), dtype=np.float32)
            f[f"{img_id}/features"].read_direct(features)
            data[i * grid_size**2 : (i + 1) * grid_size**2] += np.reshape(features, (grid_size**2, d))
    return data, img_ids


def upstream_train(path, k, niter, **cp):
    x, _ = upstream_load(path)
    km = faiss.Kmeans(DIM, k, niter=niter, verbose=False, **cp)
    km.train(x)
    return km.centroids


def upstream_assign(path, centroids):
    x, img_ids = upstream_load(path)
    index = faiss.IndexFlatL2(DIM)
    index.add(centroids)
    _, ids = index.search(x, 1)
    buf = io.BytesIO()
    np.save(buf, ids)
    mapping = {img_id: ids[i * 64 : (i + 1) * 64].squeeze() for i, img_id in enumerate(img_ids)}
    return ids, buf.getvalue(), mapping


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_grid_h5(tmp_path_factory.mktemp("src") / "src.h5", 70)


@pytest.mark.parametrize(
    "cp",
    [
        {"max_points_per_centroid": 16},  # 4480 cells > 10 * 16: faiss subsamples
        {"max_points_per_centroid": 16, "seed": 7, "nredo": 2},
        {},  # 4480 cells <= 10 * 256: faiss trains on everything
    ],
)
def test_centroids_equal_upstream(source, cp):
    k, niter = 10, 6
    expected = upstream_train(source, k, niter, **cp)
    got = kmeans.train_kmeans(source, k=k, niter=niter, dim=DIM, verbose=False, **cp)
    assert got.dtype == np.float32 and got.shape == (k, DIM)
    assert np.array_equal(got, expected), f"max |diff| {np.abs(got - expected).max()}"


def test_training_reads_only_what_faiss_trains_on(source):
    n = 70 * 64
    rows = kmeans.training_rows(n, k=10, max_points_per_centroid=16)
    assert len(rows) == 160 and len(set(rows.tolist())) == 160 and rows.max() < n
    assert np.array_equal(kmeans.training_rows(100, k=10, max_points_per_centroid=16), np.arange(100))
    tracemalloc.start()  # numpy reports its buffers to tracemalloc; faiss's own buffers are not counted
    try:
        kmeans.train_kmeans(source, k=10, niter=2, dim=DIM, max_points_per_centroid=16, verbose=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    dataset = n * DIM * 4
    assert peak < dataset / 4, f"peak {peak} B for a {dataset} B dataset"  # training set 160 rows + one image


TARGET_IMAGES = 45  # 45 * 64 cells * 48 >= faiss's BLAS threshold (128000): upstream's search takes the BLAS path


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return make_grid_h5(tmp_path_factory.mktemp("tgt") / "tgt.h5", TARGET_IMAGES, seed=3, prefix="t")


@pytest.fixture
def small_blocks():
    """faiss searches in blocks of 100 queries (default 4096): blocks end inside images, as at full size."""
    saved = faiss.cvar.distance_compute_blas_query_bs
    faiss.cvar.distance_compute_blas_query_bs = 100
    yield
    faiss.cvar.distance_compute_blas_query_bs = saved


def sharded(target, centroids, bounds, root, name, niter=6):
    prefixes = []
    for s, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        stems, ids = kmeans.assign_clusters(target, centroids, start=start, stop=stop, gpu=False)
        assert len(stems) == stop - start and ids.shape == (stop - start, 64)
        prefix = storage.join(root, f"shard-{s}", "assign")
        assert clusters.write_assignment_part(prefix, stems, ids) == ["cluster_ids.npy", "images.jsonl"]
        prefixes.append(prefix)
    vocab = clusters.Vocabulary(k=len(centroids), niter=niter, dim=DIM)
    out = {"index_uri": storage.join(root, vocab.cluster_index_file(name)), "map_uri": storage.join(root, vocab.cluster_map_file(name))}
    summary = clusters.merge_assignments(prefixes, **out)
    assert summary["images"] == bounds[-1]
    return out


@pytest.mark.parametrize("bounds", [[0, 45], [0, 5, 6, 20, 45], [0, 0, 13, 45]])
def test_assignment_equals_upstream_for_any_sharding(source, target, tmp_path, small_blocks, bounds):
    centroids = kmeans.train_kmeans(source, k=10, niter=6, dim=DIM, max_points_per_centroid=16, verbose=False)
    ids, npy_bytes, mapping = upstream_assign(target, centroids)
    out = sharded(target, centroids, bounds, str(tmp_path), "tgt")
    assert open(out["index_uri"], "rb").read() == npy_bytes  # the same .npy, byte for byte
    with open(out["map_uri"], "rb") as f:
        ours = pickle.load(f)
    assert list(ours) == list(mapping)
    for img_id, row in mapping.items():
        assert ours[img_id].dtype == np.int64 and np.array_equal(ours[img_id], row)
    assert len(np.unique(ids)) > 1


def test_small_searches_take_the_path_of_the_whole_call(target, small_blocks):
    """A shard's blocks are searched in the path faiss takes for the whole target, so distances match bit for bit."""
    x, _ = upstream_load(target)
    index = faiss.IndexFlatL2(DIM)
    index.add(np.random.default_rng(1).standard_normal((10, DIM)).astype(np.float32))
    whole, _ = index.search(x, 1)
    with kmeans._path_of_one_call(len(x), DIM):
        for b0 in range(0, len(x), 100):
            part, _ = index.search(x[b0 : b0 + 100], 1)
            assert np.array_equal(part, whole[b0 : b0 + 100])


def test_cluster_map_pickle_loads_under_numpy_1_names(source, target, tmp_path):
    centroids = kmeans.train_kmeans(source, k=10, niter=2, dim=DIM, max_points_per_centroid=16, verbose=False)
    out = sharded(target, centroids, [0, TARGET_IMAGES], str(tmp_path), "tgt")
    data = open(out["map_uri"], "rb").read()
    assert data[:2] == b"\x80\x04" and b"numpy._core" not in data and b"numpy.core.multiarray" in data
    assert clusters.read_cluster_map(out["map_uri"]).keys() == pickle.loads(data).keys()


def test_merge_refuses_overlapping_parts(target, tmp_path):
    centroids = np.random.default_rng(0).standard_normal((10, DIM)).astype(np.float32)
    prefixes = []
    for s, (start, stop) in enumerate([(0, 10), (9, 20)]):
        stems, ids = kmeans.assign_clusters(target, centroids, start=start, stop=stop, gpu=False)
        prefixes.append(str(tmp_path / f"p{s}"))
        clusters.write_assignment_part(prefixes[-1], stems, ids)
    with pytest.raises(VlprepError, match="overlap"):
        clusters.merge_assignments(prefixes, index_uri=str(tmp_path / "i.npy"), map_uri=str(tmp_path / "m.pkl"))
    assert not (tmp_path / "i.npy").exists() and not (tmp_path / "m.pkl").exists()


def test_vocabulary_on_gcs(gcs, source, target, tmp_path):
    """Source, target, parts and outputs as gs:// objects: the same centroids and ids as local files."""
    src, tgt = storage.join(gcs, "src.h5"), storage.join(gcs, "tgt.h5")
    storage.upload_file(source, src)
    storage.upload_file(target, tgt)
    cp = {"k": 10, "niter": 3, "dim": DIM, "max_points_per_centroid": 16, "verbose": False}
    centroids = kmeans.train_kmeans(src, **cp)
    assert np.array_equal(centroids, kmeans.train_kmeans(source, **cp))
    vocab = clusters.Vocabulary(k=10, niter=3, dim=DIM)
    clusters.write_centroids(storage.join(gcs, vocab.centroids_file()), centroids)
    out = sharded(tgt, clusters.read_centroids(storage.join(gcs, vocab.centroids_file()), vocab), [0, 20, TARGET_IMAGES], gcs, "tgt", niter=3)
    ids, npy_bytes, _ = upstream_assign(target, centroids)
    assert storage.read_bytes(out["index_uri"]) == npy_bytes


def test_assignment_bad_inputs(target):
    with pytest.raises(VlprepError, match="centroids"):
        kmeans.assign_clusters(target, np.zeros((4, DIM + 1), np.float32), gpu=False)
    with pytest.raises(VlprepError, match="range"):
        kmeans.assign_clusters(target, np.zeros((4, DIM), np.float32), start=5, stop=2, gpu=False)
    with pytest.raises(VlprepError, match="fewer than k"):
        kmeans.train_kmeans(target, k=5000, dim=DIM, verbose=False)
    with pytest.raises(VlprepError, match="dim"):
        kmeans.train_kmeans(target, k=5, dim=2048, verbose=False)


def test_file_names_match_upstream_and_loader():
    v = clusters.Vocabulary()
    # run_kmeans.py's names, with the folder X-LXMERT's loaders read (lxmert_data.py, lxmert_pretrain.py)
    assert v.centroids_file() == "clustering/maskrcnn_mscoco_train_centroids10000_iter20_d2048_grid8.npy"
    assert v.cluster_index_file("vg") == "clustering/maskrcnn_mscoco_train_vg_cluster_index_centroids10000_iter20_d2048_grid8.npy"
    assert v.cluster_map_file("mscoco_valid") == (
        "clustering/maskrcnn_mscoco_train_mscoco_valid_img_id_to_cluster_id_10000_iter20_d2048_grid8.pkl"
    )
    small = clusters.Vocabulary(src="vg", k=300, niter=5, dim=512, grid_size=7, imsize=224)
    assert small.centroids_file() == "clustering/maskrcnn_vg_centroids300_iter5_d512_grid7_imsize224.npy"
    with pytest.raises(VlprepError):
        clusters.Vocabulary(src="../x")


def test_targets():
    got = clusters.resolve_targets(["mscoco_train", "mscoco_valid", "vg", "nlvr_valid", "coco_test=gs://b/t.h5"], "gs://b/d")
    assert got == {
        "mscoco_train": "gs://b/d/COCO/features/maskrcnn_train_grid8.h5",
        "mscoco_valid": "gs://b/d/COCO/features/maskrcnn_valid_grid8.h5",
        "vg": "gs://b/d/VG/features/maskrcnn_grid8.h5",
        "nlvr_valid": "gs://b/d/nlvr2/features/maskrcnn_valid_v4_grid8.h5",
        "coco_test": "gs://b/t.h5",
    }
    with pytest.raises(VlprepError, match="mscoco_valid"):  # the README's "--tgt mscoco_train mscoco valid vg"
        clusters.resolve_targets(["mscoco_train", "mscoco", "valid", "vg"], "d")
    with pytest.raises(VlprepError, match="twice"):
        clusters.resolve_targets(["vg", "vg=x.h5"], "d")


def test_assign_only_with_target_equal_to_source(tmp_path):
    """Upstream crashes here (src_feat_path undefined); centroids come back from clustering/ and assign."""
    datasets = tmp_path / "datasets"
    vocab = clusters.Vocabulary(k=6, niter=3, dim=DIM)
    src = clusters.resolve_targets([vocab.src], str(datasets))[vocab.src]
    make_grid_h5(datasets / xlxmert_h5.feature_file("coco", "train2014"), 9, seed=5)
    clusters.write_centroids(str(datasets / vocab.centroids_file()), kmeans.train_kmeans(src, k=6, niter=3, dim=DIM, verbose=False))
    centroids = clusters.read_centroids(str(datasets / vocab.centroids_file()), vocab)  # the assign-only run
    stems, ids = kmeans.assign_clusters(src, centroids, gpu=False)
    _, _, mapping = upstream_assign(src, upstream_train(src, 6, 3))
    assert all(np.array_equal(mapping[s], row) for s, row in zip(stems, ids, strict=True))
    with pytest.raises(VlprepError, match="expected"):
        clusters.read_centroids(str(datasets / vocab.centroids_file()), clusters.Vocabulary(k=7, niter=3, dim=DIM))


def test_xlxmert_pretraining_reads_our_clustering_files(tmp_path):
    """lxmert_data.py's and lxmert_pretrain.py's reads, re-stated, on a vocabulary built end to end."""
    datasets = tmp_path / "datasets"
    vocab = clusters.Vocabulary(k=8, niter=3, dim=DIM)
    paths = clusters.resolve_targets(["mscoco_train", "mscoco_valid", "vg"], str(datasets))
    for n, (name, path) in enumerate(paths.items()):
        make_grid_h5(tmp_path / "raw" / f"{name}.h5", 5 + n, seed=n, prefix=f"{name}_")
        layout = xlxmert_h5.Layout("grid8", DIM)
        with xlxmert_h5.XlxmertH5Reader(tmp_path / "raw" / f"{name}.h5") as reader, xlxmert_h5.PartWriter(
            str(tmp_path / "parts" / name), layout.fields
        ) as part:
            for stem in reader:
                part.add(stem, reader[stem])
        xlxmert_h5.merge_parts([str(tmp_path / "parts" / name)], path, layout)
    centroids = kmeans.train_kmeans(paths["mscoco_train"], k=8, niter=3, dim=DIM, verbose=False)
    clusters.write_centroids(str(datasets / vocab.centroids_file()), centroids)
    for name, path in paths.items():
        sharded(path, centroids, [0, 2, 5 + list(paths).index(name)], str(datasets), name, niter=vocab.niter)

    encoder, cluster_src, n_centroids, n_iter, feat_dim, grid_size = "maskrcnn", "mscoco_train", 8, 3, DIM, 8
    clustering_dir = datasets / "clustering"
    loaded = {}
    for tgt in ("mscoco_train", "mscoco_valid", "vg"):
        name = f"{encoder}_{cluster_src}_{tgt}_img_id_to_cluster_id_{n_centroids}_iter{n_iter}_d{feat_dim}_grid{grid_size}.pkl"
        with open(clustering_dir / name, "rb") as f:
            loaded[tgt] = pickle.load(f)
    centroid_path = clustering_dir / f"{encoder}_{cluster_src}_centroids{n_centroids}_iter{n_iter}_d{feat_dim}_grid{grid_size}.npy"
    centroids_read = np.load(centroid_path)
    assert centroids_read.shape == (n_centroids, feat_dim) and np.array_equal(centroids_read, centroids)
    for tgt, mapping in loaded.items():
        with h5py.File(paths[tgt], "r") as f:
            assert list(mapping) == list(f.keys())
            for img_id, cluster_id in mapping.items():
                cluster_id = torch.from_numpy(cluster_id)
                assert cluster_id.shape == (grid_size**2,) and cluster_id.dtype == torch.int64
                feats = np.zeros((grid_size, grid_size, feat_dim), dtype=np.float32)
                f[f"{img_id}/features"].read_direct(feats)
                feats = feats.reshape(grid_size**2, feat_dim)
                nearest = ((feats[:, None, :] - centroids_read[None]) ** 2).sum(-1).argmin(1)
                assert (cluster_id.numpy() == nearest).mean() > 0.95  # each cell's id is its nearest centroid
