# The Stillpoint appliance image: a Debian 12 VM provisioned by scripts/provision.sh (the same
# script CI runs in a fresh Debian root). See docs/deploy.md and docs/appliance-image.md.
#
#   vsphere-iso.stillpoint  built in vCenter from the netinst ISO with a preseed, then turned
#                           into a template:
#     packer validate -var-file=site.pkrvars.hcl packer/
#     packer build    -only=vsphere-iso.stillpoint -var-file=site.pkrvars.hcl packer/
#   qemu.lab                the same provisioning on the lab's bootable Debian 12 disk, with
#                           QEMU on the build machine: flat raw disks for the lab's datastore.
#                           stillpoint_lab/appliance_image.py runs it (variables lab_*).
#
# Secrets (vcenter_password, build_password) come from the environment
# (PKR_VAR_vcenter_password=...) or a 0600 var file, never from the command line. packer
# wants every variable without a default set even for a build that does not use it: the lab
# build passes placeholders for the vCenter ones.

variable "vcenter_server" {
  type        = string
  description = "vCenter host name; its certificate must be trusted by the build machine."
}

variable "vcenter_username" {
  type = string
}

variable "vcenter_password" {
  type      = string
  sensitive = true
}

variable "datacenter" {
  type = string
}

variable "cluster" {
  type = string
}

variable "datastore" {
  type = string
}

variable "network" {
  type        = string
  description = "Port group with DHCP during the build (the appliance may use static IP later)."
}

variable "folder" {
  type    = string
  default = ""
}

variable "iso_path" {
  type        = string
  description = "Debian 12 netinst ISO on a datastore, e.g. \"[iso] debian-12.11.0-amd64-netinst.iso\"."
}

variable "vm_name" {
  type    = string
  default = "stillpoint-appliance"
}

variable "system_disk_mib" {
  type    = number
  default = 16384
}

variable "repository_disk_mib" {
  type        = number
  default     = 102400
  description = "The repository disk (/dev/sdb), formatted and mounted by provision.sh."
}

variable "build_password" {
  type        = string
  sensitive   = true
  description = "Temporary password of the build user; provision.sh locks it at the end."
}

variable "stillpoint_source" {
  type        = string
  description = "Stillpoint source archive: git archive --format=tar.gz -o stillpoint.tar.gz HEAD."
}

# --- the lab build (qemu.lab): defaults only let `packer validate` pass ---------------

variable "lab_base_image" {
  type        = string
  default     = "lab-guest-image.img"
  description = "The lab's bootable Debian 12 raw disk (stillpoint_lab.image); copied."
}

variable "lab_identity_file" {
  type        = string
  default     = ""
  description = "QEMU fw_cfg opt/stillpoint/lab-identity: {ip_cidr, gateway, authorized_keys}."
}

variable "lab_ssh_private_key_file" {
  type        = string
  default     = ""
  description = "The build's throwaway key; its public half is in lab_identity_file."
}

variable "lab_accel" {
  type        = string
  default     = "tcg,tb-size=128"
  description = "QEMU -accel: \"kvm\" only where /proc/cpuinfo shows vmx or svm."
}

variable "lab_cpu" {
  type        = string
  default     = "qemu64"
  description = "QEMU -cpu: \"qemu64\" with TCG (max offers AVX2, which TCG emulates slowly), \"host\" with KVM."
}

variable "lab_output_directory" {
  type    = string
  default = "output-lab"
}

variable "lab_serial_log" {
  type        = string
  default     = ""
  description = "File for the VM's serial console (empty: discarded)."
}

variable "lab_wheelhouse" {
  type        = string
  default     = "wheelhouse"
  description = "Wheels of Stillpoint's dependencies for pip in the VM (offline)."
}

variable "lab_system_disk_mib" {
  type        = number
  default     = 4096
  description = "System disk; lab-prepare.sh grows the root file system to fill it."
}

variable "lab_repository_disk_mib" {
  type        = number
  default     = 8192
  description = "The repository disk (/dev/vdb, sparse), formatted by provision.sh."
}

locals {
  build_user = "stillpoint-build"

  # What differs between the two machines, by source type (the provisioners are shared).
  repo_disk    = { "vsphere-iso" = "/dev/sdb", "qemu" = "/dev/vdb" }
  build_users  = { "vsphere-iso" = local.build_user, "qemu" = "" } # the lab's splab stays
  lab_wheels   = "/tmp/stillpoint-wheelhouse"
  pip_args     = { "vsphere-iso" = "", "qemu" = "--no-index --find-links ${local.lab_wheels}" }
  lab_serial   = var.lab_serial_log == "" ? "null" : "file:${var.lab_serial_log}"
  lab_accel_on = split(",", var.lab_accel)[0]
}

source "vsphere-iso" "stillpoint" {
  vcenter_server      = var.vcenter_server
  username            = var.vcenter_username
  password            = var.vcenter_password
  insecure_connection = false
  datacenter          = var.datacenter
  cluster             = var.cluster
  datastore           = var.datastore
  folder              = var.folder

  vm_name              = var.vm_name
  guest_os_type        = "debian11_64Guest"
  CPUs                 = 2
  RAM                  = 4096
  RAM_reserve_all      = false
  disk_controller_type = ["pvscsi"]

  storage {
    disk_size             = var.system_disk_mib
    disk_thin_provisioned = true
  }
  storage {
    disk_size             = var.repository_disk_mib
    disk_thin_provisioned = true
  }

  network_adapters {
    network      = var.network
    network_card = "vmxnet3"
  }

  iso_paths      = [var.iso_path]
  http_directory = "${path.root}/http"
  boot_wait      = "5s"
  boot_command = [
    "<esc><wait>",
    "auto preseed/url=http://{{ .HTTPIP }}:{{ .HTTPPort }}/preseed.cfg ",
    "debian-installer/locale=en_US.UTF-8 keyboard-configuration/xkb-keymap=us ",
    "netcfg/get_hostname=stillpoint netcfg/get_domain=localdomain ",
    "passwd/username=${local.build_user} passwd/user-fullname=build ",
    "passwd/user-password=${var.build_password} ",
    "passwd/user-password-again=${var.build_password} ",
    "<enter>"
  ]

  ssh_username = local.build_user
  ssh_password = var.build_password
  ssh_timeout  = "40m"
  # The build user's password is locked by provision.sh; its sudo rule goes last.
  shutdown_command = "sudo sh -c 'rm -f /etc/sudoers.d/90-build; /sbin/shutdown -h now'"

  convert_to_template = true
  notes               = "Stillpoint backup appliance (Debian 12). First boot: guestinfo.stillpoint.* or 'sudo stillpoint-setup'."
}

source "qemu" "lab" {
  # A copy of the lab's booted-by-SSH Debian disk (disk_image): no installer. "none": the
  # image is a local file that stillpoint_lab.image just built or checked (hashing 4 GiB
  # would cost more than it proves); packer uses it in place. qemu-img convert makes the
  # copy (sparse), then resizes it to disk_size.
  iso_url              = var.lab_base_image
  iso_checksum         = "none"
  disk_image           = true
  format               = "raw"
  disk_size            = "${var.lab_system_disk_mib}M"
  disk_interface       = "virtio"
  disk_discard         = "unmap" # fstrim at the end punches the freed blocks out of the raw file
  output_directory     = var.lab_output_directory
  vm_name              = "stillpoint-appliance"
  disk_additional_size = ["${var.lab_repository_disk_mib}M"]

  # packer puts accel= into -machine; QEMU refuses -accel beside "-machine accel=", and
  # tb-size exists only on -accel. So -machine is replaced (no accel) and -accel given once.
  accelerator = local.lab_accel_on
  memory      = 2048
  cpus        = 2
  headless    = true
  net_device  = "virtio-net"
  qemuargs = [
    ["-machine", "type=pc"],
    ["-accel", var.lab_accel],
    ["-cpu", var.lab_cpu],
    # packer's user-mode network, with its SSH forward bound to 127.0.0.1 only; the guest
    # reaches Debian's mirror and PyPI through slirp's NAT (10.0.2.2 gateway, 10.0.2.3 DNS).
    ["-netdev", "user,id=user.0,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22"],
    ["-fw_cfg", "name=opt/stillpoint/lab-identity,file=${var.lab_identity_file}"],
    ["-serial", local.lab_serial],
  ]

  communicator         = "ssh"
  ssh_username         = "splab"
  ssh_private_key_file = var.lab_ssh_private_key_file
  ssh_timeout          = "10m"
  shutdown_command     = "sudo systemctl poweroff"
  shutdown_timeout     = "5m"
}

build {
  sources = ["source.vsphere-iso.stillpoint", "source.qemu.lab"]

  provisioner "file" {
    source      = var.stillpoint_source
    destination = "/tmp/stillpoint-source.tar.gz"
  }

  provisioner "file" {
    source      = "${path.root}/files"
    destination = "/tmp/stillpoint-files"
  }

  # The lab's VM installs Stillpoint's dependencies offline (provision.sh's PIP_ARGS): the
  # build machine's pip has the trust and the proxies it needs for PyPI, the VM has neither.
  provisioner "file" {
    only        = ["qemu.lab"]
    generated   = true # made just before the build (no existence check at validate)
    source      = var.lab_wheelhouse
    destination = local.lab_wheels
  }

  # The lab's Debian disk is a lab guest: make it a base for the appliance (its own disks,
  # the lab's guestinfo channel kept, no guest databases).
  provisioner "shell" {
    only            = ["qemu.lab"]
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} bash '{{ .Path }}'"
    script          = "${path.root}/scripts/lab-prepare.sh"
  }

  provisioner "shell" {
    # {{ .Vars }}: environment_vars reach the script only through the command line.
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars = [
      "STILLPOINT_SRC=/tmp/stillpoint-source.tar.gz",
      "STILLPOINT_FILES=/tmp/stillpoint-files",
      "REPO_DISK=${lookup(local.repo_disk, source.type, "")}",
      "BUILD_USER=${lookup(local.build_users, source.type, "")}",
      "PIP_ARGS=${lookup(local.pip_args, source.type, "")}",
    ]
    script = "${path.root}/scripts/provision.sh"
  }

  # What every VM made from the image must make for itself: SSH host keys, machine-id.
  provisioner "shell" {
    only            = ["qemu.lab"]
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} bash '{{ .Path }}'"
    script          = "${path.root}/scripts/lab-seal.sh"
  }
}
