"""Tools that write datasets in the VG folder format (vgjax.data.vg_folder): `from_photos` turns
your own geotagged photos into a split."""
