"""Output-folder safety primitives in namedmask.io: nothing outside the folder a stage owns
is written, one writer per folder, killed runs' temporaries are cleaned, usual file modes."""
import os
import subprocess
import sys
import textwrap

import pytest

from namedmask import io


def test_inside_accepts_nested_and_refuses_escapes(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    assert io.inside(root, "masks/a/b.png") == root / "masks/a/b.png"
    for bad in ["../elsewhere/photo.png", "masks/../../x.png", str(tmp_path / "abs.png")]:
        with pytest.raises(io.OutputFolderError, match="outside"):
            io.inside(root, bad)


def test_inside_refuses_symlinked_folder_leading_out(tmp_path):
    root, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    root.mkdir(), elsewhere.mkdir()
    (root / "masks").symlink_to(elsewhere)
    with pytest.raises(io.OutputFolderError):
        io.inside(root, "masks/a.png")


def test_claim_output_dir(tmp_path):
    assert io.claim_output_dir(tmp_path / "new", "manifest.json").is_dir()  # new: ours
    dataset = tmp_path / "dataset"
    (dataset / "labels").mkdir(parents=True)
    (dataset / "labels" / "a.png").write_bytes(b"user data")
    with pytest.raises(io.OutputFolderError, match="did not make.*labels"):
        io.claim_output_dir(dataset, "manifest.json")
    assert (dataset / "labels" / "a.png").read_bytes() == b"user data"
    (dataset / "manifest.json").write_text("{}")  # our own earlier run: resumable
    assert io.claim_output_dir(dataset, "manifest.json") == dataset


def test_check_writable_dir_refuses_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(io.OutputFolderError, match="not a folder"):
        io.check_writable_dir(f)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_check_writable_dir_refuses_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(io.OutputFolderError, match="not writable"):
        io.check_writable_dir(ro)


def test_remove_stale_temporaries_only_ours(tmp_path):
    (tmp_path / "masks").mkdir()
    stale = [tmp_path / ".a.png.x1y2.tmp.png", tmp_path / "masks" / ".checkpoint.pt.abc.tmp.pt"]
    keep = [tmp_path / "a.png", tmp_path / "masks" / "notes.tmp.txt", tmp_path / ".hidden"]
    for p in stale + keep:
        p.write_bytes(b"x")
    removed = io.remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)


def test_output_lock_excludes_a_second_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from namedmask import io
        with io.OutputLock({str(tmp_path)!r}):
            print("locked", flush=True)
            time.sleep(30)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(io.OutputFolderError, match=f"in use by pid {holder.pid}"):
            with io.OutputLock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with io.OutputLock(tmp_path):  # a killed holder releases the lock
        pass


def test_atomic_writes_get_the_usual_mode_even_when_recreated(tmp_path):
    from safetensors.torch import save_file
    import torch

    with io.atomic_path(tmp_path / "w.safetensors") as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp))
    io.write_text(tmp_path / "t.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == expected
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == expected


def test_pool_list_refuses_paths_escaping_its_folder(tmp_path):
    from namedmask.data.datasets import DatasetError, list_pool_images

    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "a.jpg").write_bytes(b"")
    listing = tmp_path / "pool" / "list.txt"
    listing.write_text("a.jpg\n./b/../a.jpg\n../../elsewhere/photo.jpg\n")
    with pytest.raises(DatasetError, match=r"list.txt:3: \.\./\.\./elsewhere/photo.jpg leads outside"):
        list_pool_images(listing)
    listing.write_text("a.jpg\n./b/../a.jpg\n")
    pool = list_pool_images(listing)
    assert list(pool) == ["a.jpg"]  # normalised, duplicate dropped


def test_pool_given_an_image_or_binary_file_names_it(tmp_path):
    from namedmask.data.datasets import DatasetError, list_pool_images

    jpg = tmp_path / "photo.jpg"
    jpg.write_bytes(b"\xff\xd8\xff\xe0 not really")
    with pytest.raises(DatasetError, match="photo.jpg: an image, not a pool"):
        list_pool_images(jpg)
    binary = tmp_path / "list.txt"
    binary.write_bytes(b"a.jpg\n\xff\xfe\n")
    with pytest.raises(DatasetError, match="list.txt: not a UTF-8"):
        list_pool_images(binary)
