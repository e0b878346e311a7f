"""The FIB-SEM side: estimates now; the slice-and-view engine arrives with its issue."""
