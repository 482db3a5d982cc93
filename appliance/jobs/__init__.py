"""Jobs: the only place that sequences work (backup, restore, verify).

    environment  turns a profile into a vCenter session, a repository and guest channels
    consistency  the attempt loop: agent prepare/freeze -> snapshot -> thaw, with retries
    copy         copies a snapshot's disks (changed areas only) into a restore point
    backup       one backup job, top to bottom
"""
